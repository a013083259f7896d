"""sensplan: measure which layers of a PyTorch classifier can take how much compression, plan the best
allocation of structured pruning and weight bits for a budget, apply it, and report.

The stages live in subpackages and talk through plain files:
``sensplan.sensitivity`` (scan -> scan.json), ``sensplan.planner`` (plan.json, apply, the CLI),
``sensplan.reports`` (report.html + PNG).

A task declares its score with :class:`Metric` (its name, whether higher is better, its unit).
A compression method states its cost effect with the names here: :class:`UnitInfo` is the unit it
is asked about; :class:`Structure` and :class:`Stored` describe what a restructured layer stores,
written with the expression helpers (``maximum``, ``minimum``, ``floor``, ``ceil``,
``round_half_up``) over the unit's pruned dims (see docs/architecture.md).
"""

from sensplan._effects import UnitInfo
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
from sensplan._expr import Expr, Stored, Structure, ceil, floor, maximum, minimum, round_half_up
from sensplan._metric import Metric
from sensplan._version import __version__

__all__ = [
    "ArtifactError",
    "BudgetError",
    "CheckpointError",
    "DataSpecError",
    "Expr",
    "IncompatibleModelError",
    "InfeasibleBudgetError",
    "InternalError",
    "Metric",
    "ModelSpecError",
    "SensplanError",
    "Stored",
    "Structure",
    "UnitInfo",
    "UserInputError",
    "__version__",
    "ceil",
    "floor",
    "maximum",
    "minimum",
    "round_half_up",
]
