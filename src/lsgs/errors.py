"""The project's own error types.

Every error a user can trigger (bad data, bad config, wrong checkpoint) is one of these, with a message that names
the offending file, key or value. They subclass the matching built-in so callers may catch either.
"""


class LSGSError(Exception):
    """Base class of every user-facing error raised by this project."""


class DataError(LSGSError, ValueError):
    """A data set on disk is malformed: missing mask, corrupt image, wrong shape, empty volume..."""


class DataNotFoundError(LSGSError, FileNotFoundError):
    """A data root, category or file that should exist does not."""


class ConfigError(LSGSError, ValueError):
    """A configuration value is invalid or inconsistent."""


class CheckpointError(LSGSError, ValueError):
    """A checkpoint is of the wrong stage, the wrong shape, or from a different experiment."""


class TrainingDivergedError(LSGSError, RuntimeError):
    """A loss became NaN or infinite."""
