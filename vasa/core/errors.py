"""Errors that mean "the input is wrong", reported by the CLI as one clear line (exit code 2)
instead of a traceback. Library modules subclass InputError for such cases."""


class InputError(ValueError):
    """A missing folder, an unreadable params file, an unusable CSV header and the like."""


class CheckpointError(InputError):
    """A training run that cannot go on from, or publish, its checkpoints: no resumable state under its
    folder is intact, or the weights hold NaN or infinity. The run's folder, not the code, needs a look."""


class StorageError(InputError):
    """The disk refused a write: full, over quota, read-only or an I/O error. An InputError so that the CLI
    reports it in one line; the fix is on the machine (free space, another --out), not in the run's inputs."""
