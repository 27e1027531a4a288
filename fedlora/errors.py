"""Errors that reach the user as a message, never as a traceback."""


class FedloraError(Exception):
    """A user-facing error: the message is shown as it is, without a traceback."""


class ConfigError(FedloraError):
    pass


class DataError(FedloraError):
    pass


class RunInterrupted(FedloraError):
    """The user stopped a run; its records hold the rounds completed so far."""
