"""Errors the engine raises. Every message names the parameter or resource at fault."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request or one of its parameters is invalid; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class OutOfBlocksError(EngineError, RuntimeError):
    """The paged KV pool has too few free blocks for the allocation asked for."""


class NoRoomNowError(OutOfBlocksError):
    """Not enough free KV blocks or sequence slots at the moment; there will be once running
    requests finish (a request that could never fit raises plain OutOfBlocksError)."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint is missing, malformed, or does not match its config."""
