"""The network: signaling, WebRTC links and the frames they carry.

wire is pure (the frame format); signaling is the rendezvous server and its
client; transport is one aiortc link to a friend; node ties them together
into a peer that connects to its friends; lightpeer runs a node outside
PostgreSQL.  See docs/architecture.md.
"""
