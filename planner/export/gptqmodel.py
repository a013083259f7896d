"""``--to gptqmodel``: a GPTQModel ``QuantizeConfig`` with a ``dynamic`` per-module override map.

The base ``bits``/``group_size``/``sym`` are the scheme most of the plan's quantized layers share;
every other quantized layer gets a positive override ``"+:^<name>$": {bits, group_size, sym}``
(GPTQModel matches each key, a regex with an optional ``+:``/``-:`` prefix, against the module's
full name), and every layer the plan keeps float a negative one ``"-:^<name>$": {}`` (skipped),
the layers its scan left out (of scope, or not among ``--units``) included.
One scale per output row is ``group_size: -1``. Weight-only: GPTQModel takes 2, 3, 4 or 8 bits.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sensplan.planner.export._core import (
    EXPORTERS,
    Exported,
    Exporter,
    ExportRequest,
    exact_regex,
    out_of_scope,
    quantization_only,
    require_transformer,
    to_json,
)


def weight_scheme(spec: Any) -> tuple[int, int, bool]:
    """(bits, group size with -1 = per output channel, symmetric)."""
    return spec.weight_bits, spec.group_size or -1, spec.symmetric


@EXPORTERS.register
class GptqModelExporter(Exporter):
    name = "gptqmodel"
    description = "GPTQModel: QuantizeConfig bits/group_size plus a dynamic '+:'/'-:' regex override per module"

    def export(self, request: ExportRequest) -> Exported:
        require_transformer(request, self.name)
        specs = quantization_only(request, self.name, int_bits=(2, 3, 4, 8), activations=False)
        quantized = {u: s for u, s in specs.items() if s.int_weights}
        if not quantized:
            base: tuple[int, int, bool] = (4, 128, True)
        else:
            base = Counter(weight_scheme(s) for s in quantized.values()).most_common(1)[0][0]
        dynamic: dict[str, dict[str, Any]] = {}
        for spec in specs.values():
            if not spec.int_weights:
                dynamic[f"-:{exact_regex(spec.target)}"] = {}
            elif weight_scheme(spec) != base:
                bits, group, sym = weight_scheme(spec)
                dynamic[f"+:{exact_regex(spec.target)}"] = {"bits": bits, "group_size": group, "sym": sym}
        for name in out_of_scope(request):  # float in the plan, but GPTQModel quantizes what is not skipped
            dynamic.setdefault(f"-:{exact_regex(name)}", {})
        cfg = {"bits": base[0], "group_size": base[1], "sym": base[2], "desc_act": False, "lm_head": False,
               "dynamic": dynamic}
        doc = {**request.header(), "quantize_config": cfg, "dropped": request.dropped_record()}
        notes = [] if quantized else ["the plan quantizes no weight: every module is excluded"]
        return Exported(to_json(doc), notes=notes)
