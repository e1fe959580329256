"""Errors for input a user can fix. Jobs print any `UserInputError` as one `error:` line (jobs/common.run_main)."""


class UserInputError(ValueError):
    """Bad input the user can fix (a checkpoint, an input file, a corpus, a setting); the message says what."""


class CheckpointError(UserInputError):
    """A checkpoint or config that we refuse to load; the message names the offending key(s) or path."""


class SettingError(UserInputError):
    """A bad setting. The message names settings by their config field (`num_tokens`, as a YAML config or a
    Python caller spells them); `settings` lists those names, so that a job can show its own flags instead
    (`--num-tokens`, jobs.common.user_message)."""

    def __init__(self, message: str, *settings: str):
        super().__init__(message)
        self.settings = settings
