"""16-bit floating-point weights: float16 or bfloat16 (round to nearest, stored as 16 bits)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sensplan.sensitivity.methods import METHODS, MethodContext, Setting, UnitInfo, WeightMethod

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@METHODS.register
class HalfWeights(WeightMethod):
    name = "half"
    axis = "weight"
    stage = 30
    default_settings = ({"dtype": "float16"}, {"dtype": "bfloat16"})
    setting_key = "dtype"
    description = "16-bit floating-point weights (float16 or bfloat16)"
    speed_note = "halves the file; runs at float speed unless the runtime computes in 16 bits"

    def check_setting(self, setting: Mapping[str, Any]) -> Setting:
        d = setting["dtype"]
        aliases = {"fp16": "float16", "bf16": "bfloat16", "half": "float16"}
        d = aliases.get(d, d)
        if d not in _DTYPES:
            raise ValueError(f"The 'dtype' setting of half must be one of {sorted(_DTYPES)} (or fp16, "
                             f"bf16). Got {setting['dtype']!r} instead.")
        return {"dtype": d}

    def label(self, setting: Mapping[str, Any]) -> str:
        return "fp16" if setting["dtype"] == "float16" else "bf16"

    def level(self, setting: Mapping[str, Any]) -> float:
        return 1.0 if setting["dtype"] == "bfloat16" else 0.0  # bfloat16 keeps fewer mantissa bits

    def effect(self, setting: Mapping[str, Any], unit: UnitInfo) -> dict[str, Any]:
        return {"weight_bits": 16, "weight_dtype": str(setting["dtype"])}

    def transform(self, ctx: MethodContext, layer: str, w: torch.Tensor, setting: Mapping[str, Any]
                  ) -> torch.Tensor:
        return w.to(_DTYPES[str(setting["dtype"])]).to(w.dtype)
