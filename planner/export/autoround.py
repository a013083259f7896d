"""``--to autoround``: AutoRound's ``layer_config`` (module name -> ``{bits, group_size, sym}``).

Every layer of the plan is listed: integer weights with their bits, ``group_size`` (-1: one scale
per output row) and ``sym`` (false where the plan has zero points); a float layer as
``{"bits": 16}``, which AutoRound keeps unquantized (so are the layers the plan's scan left out:
out of scope, or not among ``--units``). The base ``bits``/``group_size``/``sym`` for
``AutoRound(...)`` are the most common scheme. Weight-only.

AutoRound keeps a Linear float (``bits`` 16, over the user's ``layer_config``) when either dimension
of its weight is not a multiple of 32: such an integer layer is refused (its shape is read from the
plan's scan, when found), so the file never says more than AutoRound will do.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sensplan.planner.export._core import (
    EXPORTERS,
    Exported,
    Exporter,
    ExportRequest,
    out_of_scope,
    quantization_only,
    require_transformer,
    to_json,
)
from sensplan.planner.export.gptqmodel import weight_scheme
from sensplan.planner.export.nncf import scan_layers, unchecked_note


@EXPORTERS.register
class AutoRoundExporter(Exporter):
    name = "autoround"
    description = "AutoRound: layer_config per module name ({bits, group_size, sym}; float layers bits 16)"

    def export(self, request: ExportRequest) -> Exported:
        require_transformer(request, self.name)
        specs = quantization_only(request, self.name, activations=False)
        shapes = {u: v.get("weight_shape") or [] for u, v in (scan_layers(request) or {}).items()}
        items = []
        for spec in specs.values():
            if spec.int_weights and any(int(d) % 32 for d in shapes.get(spec.unit, [])[:2]):
                items += request.layer_items(spec, f"AutoRound keeps a layer whose weight shape "
                                                   f"{tuple(shapes[spec.unit])} is not a multiple of 32 float")
        dropped = {d.block for d in request.unsupported(items, "plan those layers float")}
        layer_config: dict[str, dict[str, Any]] = {}
        for spec in specs.values():
            if spec.int_weights and not set(spec.blocks) & dropped:
                bits, group, sym = weight_scheme(spec)
                layer_config[spec.target] = {"bits": bits, "group_size": group, "sym": sym}
            else:
                layer_config[spec.target] = {"bits": 16}
        for name in out_of_scope(request):  # float in the plan, but AutoRound quantizes every block's layers
            layer_config.setdefault(name, {"bits": 16})
        quantized = [weight_scheme(s) for s in specs.values() if s.int_weights]
        base = Counter(quantized).most_common(1)[0][0] if quantized else (4, 128, True)
        doc = {**request.header(), "bits": base[0], "group_size": base[1], "sym": base[2],
               "layer_config": layer_config, "dropped": request.dropped_record()}
        notes = unchecked_note(request, "the layers' shapes (AutoRound keeps a layer whose dims are not multiples "
                                        "of 32 in 16 bits)") if quantized else []
        return Exported(to_json(doc), notes=notes)
