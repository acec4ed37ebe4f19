"""Errors that mean "the input is wrong", reported by the CLI as one clear line (exit code 2)
instead of a traceback. Library modules subclass InputError for such cases."""


class InputError(ValueError):
    """A missing folder, an unreadable params file, an unusable CSV header and the like."""
