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

from sensplan._effects import kept_values
from sensplan.sensitivity.methods import METHODS, MethodContext, Setting, WeightMethod


def magnitude_mask(w: torch.Tensor, density: float) -> torch.Tensor:
    """A boolean mask keeping the ``kept_values(numel, density)`` largest-magnitude entries
    (ties broken by position, so the mask is deterministic)."""
    flat = w.detach().abs().reshape(-1).float()
    keep = kept_values(flat.numel(), density)
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.reshape(w.shape)


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
        r = float(setting["ratio"])
        if not 0.0 < r < 1.0:
            raise ValueError(f"The 'ratio' setting of sparsity must be a float in the range (0.0, 1.0). "
                             f"Got {r} instead.")
        return {"ratio": r}

    def label(self, setting: Mapping[str, Any]) -> str:
        return f"sparse {float(setting['ratio']):.0%}"

    def level(self, setting: Mapping[str, Any]) -> float:
        return float(setting["ratio"])

    def effect(self, setting: Mapping[str, Any]) -> dict[str, Any]:
        return {"density": 1.0 - float(setting["ratio"]), "sparse_format": "auto"}

    def transform(self, ctx: MethodContext, layer: str, w: torch.Tensor, setting: Mapping[str, Any]
                  ) -> torch.Tensor:
        return w * magnitude_mask(w, 1.0 - float(setting["ratio"])).to(w.dtype)
