"""Exceptions raised by bncupy."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""
