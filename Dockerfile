# PostgreSQL 15 with aquapeer preloaded; docker-compose.yml runs two peers, the
# signaling server and coturn from it (docs/docker.md).
#   docker build -t aquapeer .
#   docker run -e POSTGRES_PASSWORD=secret -e AQUAPEER_DATABASE=app -p 5432:5432 aquapeer
FROM postgres:15-bookworm

# Only what the build and install need (.dockerignore keeps a local .venv and
# build outputs out); scripts/docker-build is the same steps a test runs on a
# developer's machine (tests/db/test_docker_steps.py).
WORKDIR /usr/src/aquapeer
COPY Makefile aquapeer.control META.json releases.txt ./
COPY src/ src/
COPY sql/ sql/
COPY python/ python/
COPY scripts/ scripts/
RUN scripts/docker-build --image

# Run once on an empty data directory: CREATE EXTENSION and the servers, from the
# AQUAPEER_* variables (scripts/docker-init.sh lists them).
COPY scripts/docker-init.sh /docker-entrypoint-initdb.d/50-aquapeer.sh

CMD ["postgres", "-c", "shared_preload_libraries=aquapeer"]
