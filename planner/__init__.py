"""The planner: decision blocks and cost models, the exact budget solver, and the executor.

``make_plan``, ``Budget``, the cost models and the solver need only numpy and scipy (no torch);
the executor names (``apply_plan``, ``compress``, ``load_compressed`` ...) import torch on first use.
"""

from __future__ import annotations

from typing import Any

from sensplan._tables import load_metrics
from sensplan.planner._budget import METRICS, Budget, parse_max_drop
from sensplan.planner._costs import (
    COST_MODELS,
    TIE_PATTERNS,
    AnalyticCosts,
    Block,
    CostModel,
    Costs,
    Option,
    TableCosts,
    Term,
    blocks_from_scan,
    cost_model_metrics,
    make_cost_model,
    option_key,
    tie_regex,
    tied_blocks,
)
from sensplan.planner._frontier import (
    Frontier,
    make_frontier,
    measure_frontier,
    measured_points,
    plot_frontier,
    sweep_budgets,
)
from sensplan.planner._plan import Plan, assignments, make_plan
from sensplan.planner._runtime import (
    RUNTIMES,
    check_runtime,
    compare_latency,
    kernel_problem,
    runtime_options,
    summarize_dropped,
    time_interleaved,
)
from sensplan.planner._signal import DropMap
from sensplan.planner._solver import (
    Solution,
    UniformSolution,
    brute_force,
    min_cost,
    solve,
    uniform_candidates,
    uniform_choice,
)
from sensplan.planner._verify import (
    Measured,
    Verifier,
    model_from_scan,
    scan_sample,
    split_held,
    verifier_from_scan,
)

_EXECUTOR = {
    "FineTuneConfig": "sensplan.planner._apply",
    "apply_plan": "sensplan.planner._apply",
    "compress": "sensplan.planner._apply",
    "distill_": "sensplan.planner._apply",
    "latency": "sensplan.planner._apply",
    "measure": "sensplan.planner._apply",
    "measure_original": "sensplan.planner._apply",
    "missed_budgets": "sensplan.planner._apply",
    "latency_table": "sensplan.planner._apply",
    "OrtModel": "sensplan.planner._onnx",
    "export_onnx": "sensplan.planner._onnx",
    "measure_on_onnxruntime": "sensplan.planner._onnx",
    "ort_measurements": "sensplan.planner._onnx",
    "profile": "sensplan.planner._profile",
    "CompressedModel": "sensplan.planner._compressed",
    "load_compressed": "sensplan.planner._compressed",
    "save_compressed": "sensplan.planner._compressed",
}


def __getattr__(name: str) -> Any:
    """The executor's names load torch lazily, so the planner itself stays torch-free."""
    if name in _EXECUTOR:
        import importlib

        return getattr(importlib.import_module(_EXECUTOR[name]), name)
    raise AttributeError(f"module 'sensplan.planner' has no attribute {name!r}")


__all__ = [
    "COST_MODELS",
    "METRICS",
    "RUNTIMES",
    "TIE_PATTERNS",
    "AnalyticCosts",
    "Block",
    "Budget",
    "CompressedModel",
    "CostModel",
    "Costs",
    "DropMap",
    "FineTuneConfig",
    "Frontier",
    "Measured",
    "Option",
    "OrtModel",
    "Plan",
    "Solution",
    "TableCosts",
    "Term",
    "UniformSolution",
    "Verifier",
    "apply_plan",
    "assignments",
    "blocks_from_scan",
    "brute_force",
    "check_runtime",
    "compare_latency",
    "compress",
    "cost_model_metrics",
    "distill_",
    "export_onnx",
    "kernel_problem",
    "latency",
    "latency_table",
    "load_compressed",
    "load_metrics",
    "make_cost_model",
    "make_frontier",
    "make_plan",
    "measure",
    "measure_frontier",
    "measure_on_onnxruntime",
    "measure_original",
    "measured_points",
    "min_cost",
    "missed_budgets",
    "model_from_scan",
    "option_key",
    "ort_measurements",
    "parse_max_drop",
    "plot_frontier",
    "profile",
    "runtime_options",
    "save_compressed",
    "scan_sample",
    "solve",
    "split_held",
    "summarize_dropped",
    "sweep_budgets",
    "tie_regex",
    "tied_blocks",
    "time_interleaved",
    "uniform_candidates",
    "uniform_choice",
    "verifier_from_scan",
]
