"""The pure core: state machines and values, no I/O.

Nothing here opens a socket, runs an event loop, talks to Redis or imports torch; time comes in
as an argument. The scheduler takes events and returns ``Effects``; the I/O shell around it
(``p2psched/node.py``, ``peers.py``, ``registry.py``, ``http_api.py``, ``engine_client.py``) carries
them out. ``tests/unit/test_architecture.py`` keeps it that way.
"""
