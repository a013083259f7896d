"""The planner: cost models, the exact budget solver, the executor that applies plans, and the CLI."""

from sensplan.planner._apply import (
    FineTuneConfig,
    apply_plan,
    compress,
    distill_,
    latency,
    load_metrics,
    measure,
    measure_original,
    prune_,
    quantize_,
)
from sensplan.planner._budget import Budget, parse_max_drop
from sensplan.planner._compressed import CompressedModel, load_compressed, save_compressed
from sensplan.planner._costs import METRICS, CostModel
from sensplan.planner._plan import Plan, make_plan
from sensplan.planner._solver import (
    Solution,
    brute_force,
    min_cost,
    solve,
    uniform_candidates,
    uniform_choice,
)

__all__ = [
    "METRICS",
    "Budget",
    "CompressedModel",
    "CostModel",
    "FineTuneConfig",
    "Plan",
    "Solution",
    "apply_plan",
    "brute_force",
    "compress",
    "distill_",
    "latency",
    "load_compressed",
    "load_metrics",
    "make_plan",
    "measure",
    "measure_original",
    "min_cost",
    "parse_max_drop",
    "prune_",
    "quantize_",
    "save_compressed",
    "solve",
    "uniform_candidates",
    "uniform_choice",
]
