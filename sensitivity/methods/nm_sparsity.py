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

from sensplan.sensitivity.methods import METHODS, MethodContext, Setting, WeightMethod

N, M = 2, 4


def to_rows(w: torch.Tensor) -> torch.Tensor:
    """A weight viewed as (out, kernel positions, in): the 2:4 groups run along the last dim."""
    if w.dim() == 2:
        return w.unsqueeze(1)
    return w.flatten(2).transpose(1, 2)


def from_rows(r: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 2:
        return r.squeeze(1)
    return r.transpose(1, 2).reshape(shape)


def nm_mask(w: torch.Tensor, n: int = N, m: int = M) -> torch.Tensor:
    """Keep the ``n`` largest magnitudes of every ``m`` consecutive input weights (ties: first).

    A row whose length is not a multiple of ``m`` (after input channels were pruned) is padded
    with zeros at its end, so its last group keeps at most ``n`` of the real weights.
    """
    rows = to_rows(w.detach().abs().float())
    pad = (-rows.shape[-1]) % m
    padded = torch.nn.functional.pad(rows, (0, pad), value=-1.0) if pad else rows
    groups = padded.reshape(*padded.shape[:-1], -1, m)
    # stable descending order: the earlier position wins a tie
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    mask = mask.reshape(padded.shape)[..., : rows.shape[-1]]
    return from_rows(mask, w.shape)


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

    def effect(self, setting: Mapping[str, Any]) -> dict[str, Any]:
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
                w = ctx.weight(layer)
                w.mul_(nm_mask(w).to(w.dtype))
