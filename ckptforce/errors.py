"""The handful of exceptions ckptforce raises on purpose.

Each is built on a standard exception so callers can catch it either way, and each message is meant to be
shown to a user as one line: what was found, what was expected, what to do. The CLI prints these without a
traceback (unless ``--debug``); anything else is a bug and is shown in full.
"""

from __future__ import annotations


class CkptforceError(Exception):
    """Base class: an error whose message is written for the user."""


class RunNotFoundError(CkptforceError, FileNotFoundError):
    """The run directory (or a checkpoint in it) does not exist or holds no checkpoint."""


class UnknownLayoutError(CkptforceError, ValueError):
    """Nothing in the directory matches a known checkpoint layout."""


class CheckpointReadError(CkptforceError, OSError):
    """A checkpoint file exists but cannot be read (truncated, corrupted, wrong format)."""


class PickleRefusedError(CkptforceError, PermissionError):
    """Reading the file would need a full unpickle, which can run arbitrary code."""


class CheckpointMismatchError(CkptforceError, ValueError):
    """Two checkpoints of one run hold different tensors or shapes."""


class NonFiniteWeightsError(CkptforceError, ValueError):
    """A checkpoint holds NaN or Inf weights: the run diverged there and forces through it are undefined."""


class StepError(CkptforceError, ValueError):
    """Step numbers are ambiguous (for example two checkpoints claim the same step)."""


class ModelBindError(CkptforceError, ValueError):
    """The model cannot be built (a bad --model, no config.json), or a checkpoint's tensors do not fit it."""


class ProbeFileError(CkptforceError, ValueError):
    """A probe file is missing, malformed, or does not fit the model (a response longer than its context)."""


class ProbeFileNotFoundError(ProbeFileError, FileNotFoundError):
    """The probe file given does not exist."""


class TokenizerError(CkptforceError, ValueError):
    """Probe text needs a tokenizer and none was found, or the one found cannot be loaded."""


class ExportError(CkptforceError, ValueError):
    """A remedy cannot be exported from a cube: it lacks the numbers the remedy needs, or the inputs do not match it."""
