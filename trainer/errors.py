"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class SeqtrainError(Exception):
    """A problem with the user's input (config, data, checkpoint) rather than a bug.

    The CLI catches it and prints ``seqtrain: error: <message>`` with ``exit_code`` (2 unless a
    subclass says otherwise), no traceback.
    """

    exit_code = 2


class ConfigError(SeqtrainError):
    """An invalid configuration key, type, value or combination."""


class DataError(SeqtrainError):
    """A missing, empty or malformed corpus or tokenizer."""


class CheckpointError(SeqtrainError):
    """A path that is not a usable checkpoint."""
