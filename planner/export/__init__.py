"""Exporters: a plan as another tool's configuration (``sensplan export --to NAME``).

Each exporter is a plug-in registered in :data:`EXPORTERS`: the built-ins are the public modules
of this package (one file per tool, registered on import), and other packages add theirs through
the ``sensplan.exporters`` entry point group. Every exporter decides from the choices' *effects*,
not from method names, and refuses (or, with ``drop_unsupported``, drops and lists) what its target
cannot express. See docs/exporters.md for each format's mapping.

This package imports no torch; an exporter that needs the model imports it when it runs.
"""

from __future__ import annotations

from typing import Any

from sensplan.planner.export._core import (
    EXPORT_FORMAT,
    EXPORTERS,
    Exported,
    Exporter,
    ExportRequest,
    LayerSpec,
    LoadedModel,
    Unsupported,
    by_reason,
    export_plan,
    load_exporters,
)


def replay_torch_pruning(model: Any, export: Any, example_inputs: Any = None) -> Any:
    """Prune ``model`` in place with Torch-Pruning's own functions (its DependencyGraph for a traced
    model's groups, ``prune_linear_out/in_channels`` for a transformer's heads and MLPs), removing
    exactly the channels a ``torch-pruning`` export lists; returns the model. See
    :func:`sensplan.planner.export.torch_pruning.replay_torch_pruning`."""
    from sensplan.planner.export.torch_pruning import replay_torch_pruning as replay

    return replay(model, export, example_inputs)


def apply_matmul_nbits(src: Any, dst: Any, export: Any) -> dict[str, Any]:
    """Write ``dst``: the ONNX model ``src`` with an ``onnxruntime`` export's ``matmul_nbits``
    nodes as MatMulNBits nodes carrying the plan's own codes, scales and zero points. See
    :func:`sensplan.planner.export.onnxruntime.apply_matmul_nbits`."""
    from sensplan.planner.export.onnxruntime import apply_matmul_nbits as nbits

    return nbits(src, dst, export)


def quantize_static_kwargs(config: Any) -> dict[str, Any]:
    """The keyword arguments of ``onnxruntime.quantization.quantize_static`` from an
    ``onnxruntime`` export. See :func:`sensplan.planner.export.onnxruntime.quantize_static_kwargs`."""
    from sensplan.planner.export.onnxruntime import quantize_static_kwargs as kwargs

    return kwargs(config)


__all__ = [
    "EXPORTERS",
    "EXPORT_FORMAT",
    "ExportRequest",
    "Exported",
    "Exporter",
    "LayerSpec",
    "LoadedModel",
    "Unsupported",
    "apply_matmul_nbits",
    "by_reason",
    "export_plan",
    "load_exporters",
    "quantize_static_kwargs",
    "replay_torch_pruning",
]
