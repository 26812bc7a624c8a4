"""The exception tree. Adapters translate zmq/redis/HTTP errors into these at their boundary."""


class P2PSchedError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(P2PSchedError):
    """A flag, config value or environment setting is invalid. Raised once, at start-up."""


class ProtocolError(P2PSchedError):
    """A ZeroMQ frame failed to decode or validate. The frame is dropped and counted."""


class RegistryUnavailable(P2PSchedError):
    """Redis could not be reached. Callers keep serving with their last-known peer table."""


class RequestRejected(P2PSchedError):
    """A request cannot be accepted (bad parameters, node draining, queue full)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


class RequestFailed(P2PSchedError):
    """An accepted request could not be completed; its client receives this as an error."""


class IllegalTransition(P2PSchedError):
    """A request state machine was asked for a transition its table forbids (a bug)."""
