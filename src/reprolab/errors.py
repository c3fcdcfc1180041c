"""Errors that end a command with one clear line instead of a traceback."""


class ReprolabError(Exception):
    """An expected failure: the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = 1


class ConfigError(ReprolabError):
    """Bad input from the user: a params key, an override or an input file. Exit code 2."""

    exit_code = 2


class DataError(ReprolabError):
    """An input file is missing, changed or unreadable. Exit code 2."""

    exit_code = 2


class TrainingDiverged(ReprolabError):
    """The loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int):
        super().__init__(
            f"non-finite loss at epoch {epoch}, step {step}: training diverged; "
            "lower train.lr or change train.optimizer"
        )
        self.epoch, self.step = epoch, step
