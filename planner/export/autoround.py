"""``--to autoround``: AutoRound's ``layer_config`` (module name -> ``{bits, group_size, sym}``).

Every layer of the plan is listed: integer weights with their bits, ``group_size`` (-1: one scale
per output row) and ``sym`` (false where the plan has zero points); a float layer as
``{"bits": 16}``, which AutoRound keeps unquantized (so are the layers the plan's scan left out:
out of scope, or not among ``--units``). The base ``bits``/``group_size``/``sym`` for
``AutoRound(...)`` are the most common scheme. Weight-only.
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


@EXPORTERS.register
class AutoRoundExporter(Exporter):
    name = "autoround"
    description = "AutoRound: layer_config per module name ({bits, group_size, sym}; float layers bits 16)"

    def export(self, request: ExportRequest) -> Exported:
        require_transformer(request, self.name)
        specs = quantization_only(request, self.name, activations=False)
        layer_config: dict[str, dict[str, Any]] = {}
        for spec in specs.values():
            if spec.int_weights:
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
        return Exported(to_json(doc))
