"""The exceptions the CLI turns into one-line messages: `UserError` and its kinds (exit code 2), `DivergedError` (3)."""


class UserError(Exception):
    """A problem with the user's input or setup: says what is wrong, where, and the fix."""


class DivergedError(RuntimeError):
    """Loss or gradients became NaN/inf: the phase stops and its last good weights are kept (exit code 3)."""


class DamagedFile(UserError, ValueError):
    """A file cltune wrote no longer reads back (truncated, garbled, edited): refused, never used."""


class WriteError(UserError):
    """Output could not be written (a full disk): what was finished is kept, so a run can continue with --resume."""
