"""Domain errors: every user mistake becomes one of these, never a bare traceback.

The CLI turns an ``EdgetuneError`` into a one-line message and exit code 2. Messages name the
input, the value and the fix.
"""


class EdgetuneError(Exception):
    """A user-facing error: bad input, a mismatched bundle or delta, a resource problem."""

    exit_code = 2


class BundleError(EdgetuneError):
    """The bundle folder is missing files, has a bad manifest, or its hashes do not match."""


class DataError(EdgetuneError):
    """A training or evaluation data file is empty, malformed or has a record with missing fields."""


class DeltaError(EdgetuneError):
    """A delta file is corrupt, unsigned where a signature is required, or does not fit the bundle."""


class ExportError(EdgetuneError):
    """The model source, method or quantization asked for cannot be exported."""


class TrainingError(EdgetuneError):
    """Training cannot continue (e.g. the loss became NaN); the last good checkpoint is kept."""
