"""aquapeer: PostgreSQL databases talking peer to peer over WebRTC."""

__version__ = "0.23.0"
