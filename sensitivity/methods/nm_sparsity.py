"""2:4 semi-structured sparsity per layer: in every 4 consecutive input weights, 2 are kept.

The groups of 4 run along the input channels at each kernel position: the reduction order of a
channels-last (NHWC) convolution and of a Linear layer, which is what sparse tensor-core kernels
(cuSPARSELt, Ampere and later) expect. Stored as the kept values plus 2 bits of position per kept
value. Layers whose input channels are not a multiple of 4 are skipped. MACs are counted dense: the
speed-up needs a GPU kernel that most runtimes (ONNX Runtime on the CPU included) do not have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sensplan.sensitivity._sparse import M, N, nm_mask
from sensplan.sensitivity.methods import METHODS, MethodContext, Setting, UnitInfo, WeightMethod


@METHODS.register
class SemiStructured24(WeightMethod):
    name = "sparsity_2_4"
    axis = "sparsity"
    stage = 20
    default_settings = ({"pattern": "2:4"},)
    setting_key = "pattern"
    description = "2:4 semi-structured sparsity (2 of every 4 input weights kept)"
    speed_note = ("halves MACs only on GPUs with sparse tensor cores (Ampere and later); MACs are "
                  "counted dense here, and dense CPU kernels get no faster")

    def check_setting(self, setting: Mapping[str, Any]) -> Setting:
        if setting.get("pattern") != "2:4":
            raise ValueError(f"The 'pattern' setting of sparsity_2_4 must be '2:4'. Got "
                             f"{setting.get('pattern')!r} instead.")
        return {"pattern": "2:4"}

    def label(self, setting: Mapping[str, Any]) -> str:
        return "2:4"

    def level(self, setting: Mapping[str, Any]) -> float:
        return 0.5

    def effect(self, setting: Mapping[str, Any], unit: UnitInfo) -> dict[str, Any]:
        return {"density": N / M, "sparse_format": "nm", "nm": [N, M]}

    def units(self, ctx: MethodContext, settings: Sequence[Setting]) -> dict[str, str]:
        out = {}
        for name, info in ctx.layers.items():
            shape = info["weight_shape"]
            mod = ctx.module(name)
            if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)):
                out[name] = "2:4 sparsity covers Linear, Conv and attention projection weights only."
            elif shape[1] % M:
                out[name] = (f"{shape[1]} input channels per group is not a multiple of {M}, so the "
                             f"layer has no 2:4 layout.")
            else:
                out[name] = ""
        return out

    def transform(self, ctx: MethodContext, layer: str, w: torch.Tensor, setting: Mapping[str, Any]
                  ) -> torch.Tensor:
        return w * nm_mask(w).to(w.dtype)

    def finalize_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        # Removing input channels shifts the groups of 4: re-impose the pattern on the final weights.
        with torch.no_grad():
            for layer in assignment:
                for _, w in ctx.unit_weights(layer):
                    w.mul_(nm_mask(w).to(w.dtype))
