"""The scanner: per-unit sensitivity to weight quantization and structured (group) pruning."""

from sensplan._tables import Scan
from sensplan.sensitivity._data import (
    DataSpec,
    EvalSet,
    Preprocess,
    load_eval_set,
    stratified_indices,
)
from sensplan.sensitivity._eval import EvalResult, evaluate
from sensplan.sensitivity._groups import PruningGraph, check_group, count_macs, n_remove_for
from sensplan.sensitivity._models import (
    ModelSpec,
    architecture_digest,
    build_model,
    list_models,
    load_model,
    read_state_dict,
    register_model,
)
from sensplan.sensitivity._quant import SUPPORTED_BITS, fake_quantize, quantize_per_channel
from sensplan.sensitivity._scan import ScanConfig, check_model_and_data, default_settings, scan
from sensplan.sensitivity.methods import (
    METHODS,
    Method,
    MethodContext,
    WeightMethod,
    all_methods,
    get_method,
)
from sensplan.sensitivity.tasks import TASKS, Task, TaskResult, get_task

__all__ = [
    "METHODS",
    "SUPPORTED_BITS",
    "TASKS",
    "DataSpec",
    "EvalResult",
    "EvalSet",
    "Method",
    "MethodContext",
    "ModelSpec",
    "Preprocess",
    "PruningGraph",
    "Scan",
    "ScanConfig",
    "Task",
    "TaskResult",
    "WeightMethod",
    "all_methods",
    "architecture_digest",
    "build_model",
    "check_group",
    "check_model_and_data",
    "count_macs",
    "default_settings",
    "evaluate",
    "fake_quantize",
    "get_method",
    "get_task",
    "list_models",
    "load_eval_set",
    "load_model",
    "n_remove_for",
    "quantize_per_channel",
    "read_state_dict",
    "register_model",
    "scan",
    "stratified_indices",
]
