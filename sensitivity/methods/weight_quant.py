"""Integer weight quantization (MSE-searched clipping): per output channel or group-wise scales,
symmetric or with a zero point.

Setting: ``bits`` in 2..8; optionally ``group`` (32, 64 or 128 values of an output row per scale,
instead of one scale per output channel) and ``zero_point: true`` (asymmetric codes in
[0, 2**bits - 1]: all 2**bits levels). On the command line a setting is written as its label
without ``int``: ``4`` (per channel), ``4a`` (with a zero point), ``4g128`` (group-wise), ``4ag128``.
Stored as packed codes plus one float32 scale (and a ``bits``-bit zero point) per channel or group.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from sensplan.sensitivity._quant import (
    GROUP_SIZES,
    INT_CODES,
    SUPPORTED_BITS,
    QFormat,
    dequantize_codes,
    fake_quantize,
    quantize,
)
from sensplan.sensitivity.methods import METHODS, MethodContext, Setting, UnitInfo, WeightMethod

_TOKEN = re.compile(r"^(\d+)(a?)(?:g(\d+))?$")


@METHODS.register
class WeightQuant(WeightMethod):
    name = "weight_quant"
    axis = "weight"
    stage = 30
    default_on = True
    default_settings = tuple({"bits": b} for b in (8, 6, 4, 3, 2))
    # a transformer's Linear rows are long and its outliers local: group-wise scales below 8 bits
    transformer_settings = ({"bits": 8}, {"bits": 6}, {"bits": 4, "group": 128}, {"bits": 4, "group": 64},
                            {"bits": 4, "group": 32}, {"bits": 3, "group": 128}, {"bits": 3, "group": 32},
                            {"bits": 2, "group": 32})
    setting_key = "bits"
    description = ("integer weights (bits 2-8), MSE-searched clipping: per channel, or with --bits 4g128 "
                   "group-wise scales (groups of 32/64/128), 4a a zero point (asymmetric)")
    speed_note = ("weight-only: shrinks the file; eager PyTorch runs the dequantized float weights, so "
                  "latency does not change")

    def check_setting(self, setting: Mapping[str, Any]) -> Setting:
        unknown = set(setting) - {"bits", "group", "zero_point"}
        if unknown:
            raise ValueError(f"weight_quant settings take bits, group and zero_point; got {sorted(unknown)}.")
        b, group, zero_point = setting["bits"], setting.get("group", 0) or 0, bool(setting.get("zero_point", False))
        if isinstance(b, str):
            m = _TOKEN.match(b.strip().lower())
            if m is None:
                raise ValueError(f"A weight_quant setting is BITS, then 'a' for a zero point, then 'gSIZE' for "
                                 f"group-wise scales, e.g. 4, 4a, 4g128, 4ag64. Got {b!r} instead.")
            b, zero_point, group = int(m.group(1)), zero_point or bool(m.group(2)), int(m.group(3) or group)
        if not isinstance(b, int) or isinstance(b, bool) or b not in SUPPORTED_BITS:
            raise ValueError(f"The 'bits' setting of weight_quant must be one of {SUPPORTED_BITS}. "
                             f"Got {b!r} instead.")
        if group not in (0, *GROUP_SIZES):
            raise ValueError(f"The 'group' setting of weight_quant must be one of {GROUP_SIZES} (values per "
                             f"scale along a row). Got {group!r} instead.")
        return {"bits": b, **({"group": group} if group else {}), **({"zero_point": True} if zero_point else {})}

    def label(self, setting: Mapping[str, Any]) -> str:
        return (f"int{setting['bits']}{'a' if setting.get('zero_point') else ''}"
                f"{'g' + str(setting['group']) if setting.get('group') else ''}")

    def level(self, setting: Mapping[str, Any]) -> float:
        # fewer bits is stronger; at equal bits a zero point and smaller groups are milder (finer)
        finer = (0.5 if setting.get("zero_point") else 0.0) + \
            (0.25 + (128 - int(setting["group"])) / 1024 if setting.get("group") else 0.0)
        return 32.0 - float(setting["bits"]) - finer

    def family(self, setting: Mapping[str, Any]) -> str:
        # fewer bits of one format is never better; formats of different kinds are not nested
        return self.label(setting).removeprefix(f"int{setting['bits']}")

    def effect(self, setting: Mapping[str, Any], unit: UnitInfo) -> dict[str, Any]:
        bits = int(setting["bits"])
        return {"weight_bits": bits, "weight_dtype": "int", "scale_bits": 32,
                **({"group_size": int(setting["group"])} if setting.get("group") else {}),
                **({"zero_point_bits": bits} if setting.get("zero_point") else {})}

    def transform(self, ctx: MethodContext, layer: str, w: torch.Tensor, setting: Mapping[str, Any]
                  ) -> torch.Tensor:
        return fake_quantize(w, QFormat.of(setting))

    def apply_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        plain = {layer: st for layer, st in assignment.items() if not (st.get("group") or st.get("zero_point"))}
        super().apply_(ctx, plain)  # one symmetric scale per channel: the container re-derives it exactly
        finer = {layer: st for layer, st in assignment.items() if layer not in plain}
        for layer, setting in finer.items():
            for key, w in ctx.unit_weights(layer):
                self._quantize_(ctx, key, w, setting)

    def finalize_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        # Group-wise scales are groups of the row as stored. Where pruning removed input channels
        # after apply_ quantized (zeros in their place), the groups moved: quantize the pruned rows
        # again, as the container will store them (and as the planner priced them).
        codes = ctx.cache.get(INT_CODES, {})
        for layer, setting in assignment.items():
            if setting.get("group") or setting.get("zero_point"):
                for key, w in ctx.unit_weights(layer):
                    cached = codes.get(key)
                    if cached is not None and tuple(cached[0].shape) == tuple(w.shape):
                        continue
                    kept = _kept_rows(cached, w, QFormat.of(setting)) if cached is not None else None
                    if kept is not None:  # only output rows went: keep their codes (quantizing the
                        q, sc, z = cached  # result again could pick other scales for a few rows)
                        codes[key] = (q[kept], sc[kept], None if z is None else z[kept])
                    else:
                        self._quantize_(ctx, key, w, setting)

    @staticmethod
    @torch.no_grad()
    def _quantize_(ctx: MethodContext, key: str, w: torch.Tensor, setting: Mapping[str, Any]) -> None:
        """Quantize ``w`` in place, and leave its codes for the container (``INT_CODES``): at these
        formats quantizing the result again can pick other scales, so the file stores these."""
        fmt = QFormat.of(setting)
        q, s, z = quantize(w.detach(), fmt)
        w.copy_(dequantize_codes(q, s, z, fmt.group_size, w.dtype))
        ctx.cache.setdefault(INT_CODES, {})[key] = (q, s, z)


def _kept_rows(cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], w: torch.Tensor,
               fmt: QFormat) -> list[int] | None:
    """The rows of the codes ``cached`` that ``w`` kept, in order, when pruning removed only output
    rows (each row of ``w`` equals a decoded cached row); None when anything else changed."""
    q, s, z = cached
    if tuple(q.shape[1:]) != tuple(w.shape[1:]) or q.shape[0] < w.shape[0]:
        return None
    old = dequantize_codes(q, s, z, fmt.group_size, w.dtype).reshape(q.shape[0], -1)
    new = w.detach().reshape(w.shape[0], -1)
    kept, i = [], 0
    for r in range(new.shape[0]):
        while i < old.shape[0] and not torch.equal(old[i], new[r]):
            i += 1
        if i == old.shape[0]:
            return None
        kept.append(i)
        i += 1
    return kept
