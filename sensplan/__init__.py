"""sensplan: measure which layers of a PyTorch classifier can take how much compression, plan the best
allocation of structured pruning and weight bits for a budget, apply it, and report.

The stages live in subpackages and talk through plain files:
``sensplan.sensitivity`` (scan -> scan.json), ``sensplan.planner`` (plan.json, apply, the CLI),
``sensplan.reports`` (report.html + PNG).
"""

from sensplan._errors import (
    ArtifactError,
    BudgetError,
    CheckpointError,
    DataSpecError,
    IncompatibleModelError,
    InfeasibleBudgetError,
    InternalError,
    ModelSpecError,
    SensplanError,
    UserInputError,
)
from sensplan._version import __version__

__all__ = [
    "ArtifactError",
    "BudgetError",
    "CheckpointError",
    "DataSpecError",
    "IncompatibleModelError",
    "InfeasibleBudgetError",
    "InternalError",
    "ModelSpecError",
    "SensplanError",
    "UserInputError",
    "__version__",
]
