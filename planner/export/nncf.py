"""``--to nncf``: the arguments of ``nncf.compress_weights`` (as JSON describing the call).

NNCF compresses weights in one primary ``mode`` (``INT4_SYM``/``INT4_ASYM`` with a ``group_size``,
-1 = per output channel; or ``INT8_SYM``/``INT8_ASYM``, per channel) and puts the rest in a
``backup_mode`` (``INT8_SYM``/``INT8_ASYM``/``NONE``); ``ratio`` is the share of the weights in the
primary mode. A plan that mixes 4- and 8-bit layers maps to ratio = (weights of its 4-bit layers) /
(weights of all its integer layers), counted from the plan's scan when it is found (else by layer
count, and the file says so). NNCF then picks *which* layers get 4 bits by its own sensitivity
metric: the plan's proportion is kept, its per-layer choice is not (the file says so under
``exact``). The plan's float layers go into ``ignored_scope`` (module names, and regex patterns that
match NNCF's node names, which start with the module name).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from sensplan.planner.export._core import (
    EXPORTERS,
    Exported,
    Exporter,
    ExportRequest,
    LayerSpec,
    Unsupported,
    nothing_quantized,
    out_of_scope,
    quantization_only,
    to_json,
)


@EXPORTERS.register
class NncfExporter(Exporter):
    name = "nncf"
    description = "NNCF: compress_weights mode/group_size/ratio/backup_mode and an IgnoredScope of the float layers"

    def export(self, request: ExportRequest) -> Exported:
        specs = quantization_only(request, "NNCF compress_weights", int_bits=(4, 8), activations=False)
        int4 = {u: s for u, s in specs.items() if s.int_weights and s.weight_bits == 4}
        int8 = {u: s for u, s in specs.items() if s.int_weights and s.weight_bits == 8}
        items: list[Unsupported] = []
        for s in int8.values():
            if s.group_size:
                items += request.layer_items(s, "NNCF's 8-bit weight modes are per output channel, not grouped")
        four = Counter((s.symmetric, s.group_size) for s in int4.values()).most_common(1)
        eight = Counter(s.symmetric for s in int8.values() if not s.group_size).most_common(1)
        for s in int4.values():
            if (s.symmetric, s.group_size) != four[0][0]:
                items += request.layer_items(s, "NNCF takes one 4-bit scheme (symmetry, group size) per call")
        for s in int8.values():
            if not s.group_size and s.symmetric != eight[0][0]:
                items += request.layer_items(s, "NNCF takes one 8-bit scheme (symmetry) per call")
        dropped = {d.block for d in request.unsupported(items, "plan with one 4-bit and one 8-bit format")}
        int4 = {u: s for u, s in int4.items() if not set(s.blocks) & dropped}
        int8 = {u: s for u, s in int8.items() if not set(s.blocks) & dropped}
        floats = [s.target for u, s in specs.items() if u not in int4 and u not in int8]
        floats += [n for n in out_of_scope(request) if n not in floats]
        sizes, counted_by = _weights(request, [*int4, *int8])
        args: dict[str, Any]
        if int4:
            sym, group = four[0][0]
            backup = ("INT8_SYM" if eight[0][0] else "INT8_ASYM") if int8 else "NONE"
            total = sum(sizes[u] for u in [*int4, *int8])
            args = {"mode": "INT4_SYM" if sym else "INT4_ASYM", "group_size": group or -1,
                    "ratio": round(sum(sizes[u] for u in int4) / total, 6), "backup_mode": backup}
        elif int8:
            args = {"mode": "INT8_SYM" if eight[0][0] else "INT8_ASYM"}
        else:
            raise nothing_quantized(request, "NNCF compress_weights")
        args["all_layers"] = True
        args["ignored_scope"] = {"names": floats, "patterns": [f"^{re.escape(n)}(/|$)" for n in floats],
                                 "validate": False}
        exact = (not int4 or not int8)
        doc = {**request.header(), "compress_weights": args,
               "layers": {s.target: _state(s) for s in specs.values()},
               "ratio_counted_by": counted_by if int4 and int8 else None,
               "exact": exact, "exact_note": None if exact else (
                   "NNCF picks which layers get the 4-bit mode by its own sensitivity metric; the plan's share "
                   "of 4-bit weights is kept, its per-layer choice is not"),
               "dropped": request.dropped_record()}
        notes = [] if exact else [doc["exact_note"]]
        return Exported(to_json(doc), notes=notes)


def _state(spec: LayerSpec) -> str:
    if not spec.int_weights:
        return "float (ignored_scope)"
    return f"int{spec.weight_bits}{'' if spec.symmetric else ' asym'}" + (
        f" g{spec.group_size}" if spec.group_size else "")


def _weights(request: ExportRequest, units: list[str]) -> tuple[dict[str, float], str]:
    """Each layer's weight count from the plan's scan (found at its recorded path with its recorded
    digest), else 1 per layer."""
    import math
    import os

    rec = request.plan.data.get("scan") or {}
    path = rec.get("path")
    if path and os.path.isfile(path):
        from sensplan._artifacts import file_sha256

        if not rec.get("sha256") or file_sha256(path) == rec["sha256"]:
            import json

            layers = json.loads(Path(path).read_text()).get("layers") or {}
            if all(u in layers for u in units):
                return {u: float(math.prod(layers[u]["weight_shape"])) for u in units}, "weights (from the scan)"
    return dict.fromkeys(units, 1.0), "layers (the plan's scan was not found: each layer counts 1)"
