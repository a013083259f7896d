"""Unstructured magnitude sparsity per layer: the smallest-magnitude weights become zero.

Setting: ``ratio``, the fraction of the layer's weights set to zero (0.5 ... 0.95). The size is
counted honestly in a stated sparse format: a bitmask or CSR, whichever is smaller for the layer
(see :mod:`sensplan._effects`); the container stores exactly that. MACs are unchanged: dense kernels
multiply the zeros too, so this saves memory and file size, not time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sensplan.sensitivity._sparse import magnitude_mask
from sensplan.sensitivity.methods import (
    METHODS,
    MethodContext,
    Setting,
    UnitInfo,
    WeightMethod,
    ratio_setting,
    setting_value,
)


def live_count(w: torch.Tensor) -> int:
    """Entries outside all-zero output channels (dim 0) and all-zero input channels (dim 1).

    The executor zeroes a pruned channel in every member before it removes the channel, so when
    sparsity runs after pruning these are the entries the stored (pruned) tensor keeps: the
    ``density`` of a setting is a fraction of them, as the planner prices it.
    """
    nz = w.detach() != 0
    if nz.dim() < 2:
        return int(nz.numel())
    rows = nz.reshape(nz.shape[0], -1).any(dim=1)
    cols = nz.transpose(0, 1).reshape(nz.shape[1], -1).any(dim=1)
    return int(rows.sum()) * int(cols.sum()) * (nz[0, 0].numel() if nz.dim() > 2 else 1)


@METHODS.register
class UnstructuredSparsity(WeightMethod):
    name = "sparsity"
    axis = "sparsity"
    stage = 20
    default_settings = tuple({"ratio": r} for r in (0.5, 0.7, 0.8, 0.9, 0.95))
    setting_key = "ratio"
    description = "unstructured magnitude sparsity per layer (fraction of weights zeroed)"
    speed_note = ("saves file size and memory only: dense kernels multiply the zeros, so MACs and "
                  "latency do not fall")

    def check_setting(self, setting: Mapping[str, Any]) -> Setting:
        r = ratio_setting("sparsity", setting_value("sparsity", setting, "ratio"))
        return {"ratio": r}

    def label(self, setting: Mapping[str, Any]) -> str:
        return f"sparse {float(setting['ratio']):.0%}"

    def level(self, setting: Mapping[str, Any]) -> float:
        return float(setting["ratio"])

    def effect(self, setting: Mapping[str, Any], unit: UnitInfo) -> dict[str, Any]:
        return {"density": 1.0 - float(setting["ratio"]), "sparse_format": "auto"}

    def transform(self, ctx: MethodContext, layer: str, w: torch.Tensor, setting: Mapping[str, Any]
                  ) -> torch.Tensor:
        mask = magnitude_mask(w, 1.0 - float(setting["ratio"]), numel=live_count(w))
        return w * mask.to(w.dtype)
