"""The exceptions sensplan raises, drawn once.

::

    SensplanError                 base class; never raised itself
    ├── UserInputError            the user's input is wrong; the CLI prints the message, exits 2
    │   ├── ModelSpecError        a model spec cannot be resolved (unknown name, missing file, bad factory)
    │   ├── CheckpointError       a weights file cannot be read or does not fit the model
    │   ├── DataSpecError         a data spec cannot be resolved, or the data cannot be batched
    │   ├── BudgetError           a budget string is malformed
    │   ├── InfeasibleBudgetError no plan reaches the budget; the message states the smallest reachable cost
    │   ├── ArtifactError         a scan/plan/metrics/compressed-model file is missing, of the wrong
    │   │                         format, or of an unsupported schema version
    │   └── IncompatibleModelError a plan or scan does not belong to the model it is applied to
    └── InternalError             a bug in sensplan (the CLI shows the traceback and asks for a report)

Every ``UserInputError`` message names what to do instead.
"""

from __future__ import annotations


class SensplanError(Exception):
    """Base class of every exception sensplan raises on purpose."""


class UserInputError(SensplanError):
    """Raised when the user's input is wrong. The CLI prints the message and exits with code 2."""


class ModelSpecError(UserInputError):
    """Raised when a model spec cannot be resolved to a model."""


class CheckpointError(UserInputError):
    """Raised when a weights file cannot be read, or its tensors do not fit the model."""


class DataSpecError(UserInputError):
    """Raised when a data spec cannot be resolved, or the data cannot be batched."""


class BudgetError(UserInputError):
    """Raised when a budget or max-drop string is malformed."""


class InfeasibleBudgetError(UserInputError):
    """Raised when no combination of scanned settings reaches the budget."""


class ArtifactError(UserInputError):
    """Raised when an artifact file is missing, malformed, or of an unsupported format/version."""


class IncompatibleModelError(UserInputError):
    """Raised when a scan or plan does not belong to the model it is used with."""


class InternalError(SensplanError):
    """Raised when sensplan reaches a state that is a bug in sensplan, not a user mistake."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters, without a final
    period (for one-line messages that quote an error)."""
    return (str(e).strip().splitlines() or [""])[0][:limit].rstrip(" .")
