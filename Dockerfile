# PostgreSQL 15 with aquapeer preloaded (used by the tests' docker path).
#   docker build -t aquapeer .
#   docker run -e POSTGRES_PASSWORD=secret -p 5432:5432 aquapeer
FROM postgres:15-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      postgresql-plpython3-15 postgresql-server-dev-15 python3-pip make gcc \
 && rm -rf /var/lib/apt/lists/*

# Only what the build and install need (a local .venv or build outputs must
# not end up in the image; `make clean` drops stale objects).
WORKDIR /usr/src/aquapeer
COPY Makefile aquapeer.control META.json ./
COPY src/ src/
COPY sql/ sql/
COPY python/ python/
COPY scripts/ scripts/
RUN make clean && make && make install && make clean

CMD ["postgres", "-c", "shared_preload_libraries=aquapeer"]
