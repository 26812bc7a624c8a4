"""p2psched: LLM inference nodes that balance load by stealing work from each other.

Redis is only the registry; requests and tokens travel node to node over ZeroMQ.
"""

PROTOCOL_VERSION = 3

__all__ = ["PROTOCOL_VERSION"]
