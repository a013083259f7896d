"""Sparse storage layouts shared by the sparsity methods and the container: which weights a
magnitude mask keeps (``"auto"`` layout) and the N:M pattern along the input channels (``"nm"``).

The method decides which values become zero; the container stores exactly the positions these
functions give, so what the plan priced is what the file holds.
"""

from __future__ import annotations

import torch

from sensplan._effects import kept_values

N, M = 2, 4


def magnitude_mask(w: torch.Tensor, density: float, *, numel: int | None = None) -> torch.Tensor:
    """A boolean mask keeping the ``kept_values(numel, density)`` largest-magnitude entries
    (ties broken by position, so the mask is deterministic); ``numel`` defaults to ``w.numel()``."""
    flat = w.detach().abs().reshape(-1).float()
    keep = kept_values(flat.numel() if numel is None else numel, density)
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.reshape(w.shape)


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
