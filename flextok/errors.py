"""Errors for input a user can fix. Jobs print any `UserInputError` as one `error:` line (jobs/common.run_main)."""


class UserInputError(ValueError):
    """Bad input the user can fix (a checkpoint, an input file, a corpus, a setting); the message says what."""


class CheckpointError(UserInputError):
    """A checkpoint or config that we refuse to load; the message names the offending key(s) or path."""
