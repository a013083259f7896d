"""Integer weight quantization per output channel (symmetric, MSE-searched clipping).

Setting: ``bits`` in 2..8. Stored as packed codes plus one float32 scale per output channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sensplan.sensitivity._quant import SUPPORTED_BITS, fake_quantize
from sensplan.sensitivity.methods import METHODS, MethodContext, Setting, UnitInfo, WeightMethod


@METHODS.register
class WeightQuant(WeightMethod):
    name = "weight_quant"
    axis = "weight"
    stage = 30
    default_on = True
    default_settings = tuple({"bits": b} for b in (8, 6, 4, 3, 2))
    setting_key = "bits"
    description = "per-channel symmetric integer weights (bits), MSE-searched clipping"
    speed_note = ("weight-only: shrinks the file; eager PyTorch runs the dequantized float weights, so "
                  "latency does not change")

    def check_setting(self, setting: Mapping[str, Any]) -> Setting:
        b = setting["bits"]
        if not isinstance(b, int) or b not in SUPPORTED_BITS:
            raise ValueError(f"The 'bits' setting of weight_quant must be one of {SUPPORTED_BITS}. "
                             f"Got {b!r} instead.")
        return {"bits": b}

    def label(self, setting: Mapping[str, Any]) -> str:
        return f"int{setting['bits']}"

    def level(self, setting: Mapping[str, Any]) -> float:
        return 32.0 - float(setting["bits"])

    def effect(self, setting: Mapping[str, Any], unit: UnitInfo) -> dict[str, Any]:
        return {"weight_bits": int(setting["bits"]), "weight_dtype": "int", "scale_bits": 32}

    def transform(self, ctx: MethodContext, layer: str, w: torch.Tensor, setting: Mapping[str, Any]
                  ) -> torch.Tensor:
        return fake_quantize(w, int(setting["bits"]))
