"""Errors gradscope raises on purpose, and the exit codes the CLI maps them to.

Every failure that is the user's to fix (a bad target, an input shape the
model rejects, a device that is not there) is a :class:`GradscopeError`: the
CLI prints its one-line message and hint and exits 2 without a traceback.
Anything else escaping the pipeline is a bug in gradscope and keeps its
traceback.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes of the CLI (docs/contract.md section 2)."""

    OK = 0
    FINDINGS = 1
    USAGE = 2


class GradscopeError(Exception):
    """Base class of every error gradscope raises deliberately.

    ``hint`` says what to do about it; the CLI prints ``message (hint)`` on one
    line.
    """

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint flattened to a single line for stderr."""
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())


class TargetError(GradscopeError):
    """The target cannot be found, imported or turned into a model."""


class NoModelError(TargetError):
    """The target imports fine but defines nothing gradscope can build as a model.

    ``analyze --skip-non-models`` (the pre-commit hook) skips such files instead of
    failing: an ordinary Python file in a commit is not an error.
    """


class InputError(GradscopeError):
    """No example inputs can be had, or the model rejects the ones given."""


class DeviceError(GradscopeError):
    """The requested device does not exist on this machine."""


class OutputError(GradscopeError):
    """A report cannot be written, or the model's output cannot be probed."""


class ConfigError(GradscopeError):
    """An option or a ``[tool.gradscope]`` setting is invalid."""


class TraceError(GradscopeError):
    """No tracer, symbolic or runtime, could record the model's graph."""


class ModelRunError(GradscopeError):
    """The model raised while gradscope ran it."""


class FixError(GradscopeError):
    """A recommendation's action cannot be applied to the model given (``gradscope.fixes``)."""


class ResourceError(GradscopeError):
    """The model would not fit in the memory the probe has (``gradscope.resources``).

    Raised before anything is allocated or moved, because running out of memory
    later is worse: on the CPU the kernel kills the process without a message,
    and on a GPU the out-of-memory error says nothing about ``--meta``.
    """


#: torch's words when BatchNorm (train mode) gets a single value per channel.
_BATCHNORM_OF_ONE = "Expected more than 1 value per channel"


def model_error_hint(error: BaseException) -> str | None:
    """A better hint than "fix the forward" for model errors gradscope can explain.

    BatchNorm in train mode cannot normalise one value per channel (a batch of
    one with no spatial size); that is the input's or the mode's fault, not the
    model's, so the hint names the two options that fix it.
    """
    if _BATCHNORM_OF_ONE in str(error):
        return ("BatchNorm in train mode needs more than one value per channel: give a "
                "batch of 2 or more (--input-shape 2,...) or run the probe with "
                "--probe-mode eval")
    return None
