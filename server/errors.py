"""Errors of the inference server, each meant to reach the operator as one clear line."""


class ServerError(Exception):
    """Base of the server package's errors."""


class ModelLoadError(ServerError):
    """A model directory or preset cannot be loaded: missing file, unsupported architecture,
    tensor shape mismatch, bad config value."""


class EngineConfigError(ServerError):
    """An engine setting (``EngineConfig``) is out of range. Raised once, when the config is built."""
