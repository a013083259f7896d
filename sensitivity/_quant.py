"""Per-channel symmetric weight quantization, shared by the scanner's probes and the executor.

A weight ``w`` of shape (out, ...) at ``bits`` bits becomes integers ``q`` in
``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` and one float32 ``scale`` per output channel, with
``w ≈ q * scale``. The scale of each channel is chosen from a grid of clipping ratios of its
largest magnitude to minimise the squared rounding error (at 8 bits this is nearly ``max|w|``; at 2-4
bits clipping the outliers lowers the error a lot). The range is symmetric (2 bits → {-1, 0, 1}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sensplan.sensitivity._data import block_spans

#: Bit widths the quantizer supports; 32 in a plan means "kept in float32".
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_BITS = 32
_CLIP_GRID = torch.linspace(0.2, 1.0, 33)
_BLOCK_CPU, _BLOCK_ACCEL = 1 << 20, 1 << 26  # elements per block of the clipping search


def qmax(bits: int) -> int:
    return int(2 ** (bits - 1) - 1)


@torch.no_grad()
def quantize_per_channel(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(q, scale)``: int8 codes of ``w``'s shape and float32 scales of shape (out,).

    Example: ``q, s = quantize_per_channel(conv.weight, 4)``; ``q * s.view(-1, 1, 1, 1)`` is the
    4-bit weight.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"The 'bits' parameter must be one of {SUPPORTED_BITS}. Got {bits!r} instead.")
    wf = w.detach().float().reshape(w.shape[0], -1)
    m = qmax(bits)
    amax = wf.abs().amax(dim=1).clamp_min(1e-12)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = amax / m
    # The search runs over blocks of rows in one reused buffer, with in-place ops: the same
    # arithmetic per element as on the whole tensor (bit-identical codes and scales; tested), without
    # a fresh tensor of the weight's size per op and clipping ratio (bench/bench_quant.py: 15-18x
    # faster on weights of 2M+ values on one CPU thread)
    n, cols = wf.shape
    # at least 2 rows per block, and no lone last row: torch may sum a lone long row in another
    # order (in parallel) than the rows of a matrix
    spans = block_spans(n, max(2, (_BLOCK_CPU if wf.device.type == "cpu" else _BLOCK_ACCEL) // max(1, cols)))
    buf = torch.empty((max((r1 - r0 for r0, r1 in spans), default=0), cols), dtype=wf.dtype, device=wf.device)
    for r0, r1 in spans:
        blk, a = wf[r0:r1], amax[r0:r1]
        t = buf[: len(blk)]
        be, bs = best_err[r0:r1], best_scale[r0:r1]
        for ratio in _CLIP_GRID:
            s = (a * ratio / m).unsqueeze(1)
            torch.div(blk, s, out=t)
            err = t.round_().clamp_(-m, m).mul_(s).sub_(blk).square_().sum(dim=1)
            better = err < be
            be.copy_(torch.where(better, err, be))
            bs.copy_(torch.where(better, s.squeeze(1), bs))
    q = torch.clamp(torch.round(wf / best_scale.unsqueeze(1)), -m, m).to(torch.int8)
    return q.reshape(w.shape), best_scale.float()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.view(-1, *([1] * (q.dim() - 1)))).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` rounded to ``bits`` bits per channel and returned in ``w``'s dtype (a new tensor)."""
    q, s = quantize_per_channel(w, bits)
    return dequantize(q, s, w.dtype)


_PACK_BLOCK = 1 << 20  # codes per block (a multiple of 8: every block ends on a byte boundary)


def pack_codes(q: torch.Tensor, bits: int) -> bytes:
    """Pack signed codes into ``ceil(numel * bits / 8)`` bytes (offset binary, little-endian bits).
    Packed in blocks, so the bit planes never cost more than ``bits`` bytes per code of one block."""
    u = (q.detach().reshape(-1).cpu().to(torch.int16) + qmax(bits)).numpy().astype(np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    return b"".join(np.packbits(((u[i:i + _PACK_BLOCK, None] >> shifts) & 1).reshape(-1), bitorder="little")
                    .tobytes() for i in range(0, len(u), _PACK_BLOCK)) if len(u) else b""


def unpack_codes(data: bytes, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes of ``shape``."""
    n = int(np.prod(shape)) if shape else 1
    raw = np.frombuffer(data, dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.int16)
    out = np.empty(n, dtype=np.int8)
    step = _PACK_BLOCK * bits // 8  # bytes per block
    for j, i in enumerate(range(0, n, _PACK_BLOCK)):
        k = min(_PACK_BLOCK, n - i)
        planes = np.unpackbits(raw[j * step:j * step + step], bitorder="little")[: k * bits]
        out[i:i + k] = (planes.reshape(k, bits).astype(np.int16) << shifts).sum(axis=1) - qmax(bits)
    return torch.from_numpy(out).reshape(shape)


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def act_qparams(lo: float, hi: float, bits: int) -> dict[str, Any]:
    """Affine per-tensor parameters for values in ``[lo, hi]`` (widened to include 0):
    ``q = clamp(round(x / scale) + zero_point, 0, 2**bits - 1)``."""
    lo, hi = min(0.0, float(lo)), max(0.0, float(hi))
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels if hi > lo else 1.0
    zero_point = int(min(levels, max(0, round(-lo / scale))))
    return {"bits": int(bits), "scale": float(scale), "zero_point": zero_point}


def fake_quantize_activation(x: torch.Tensor, qp: Mapping[str, Any]) -> torch.Tensor:
    levels = 2 ** int(qp["bits"]) - 1
    scale, zp = float(qp["scale"]), int(qp["zero_point"])
    q = torch.clamp(torch.round(x / scale) + zp, 0, levels)
    return ((q - zp) * scale).to(x.dtype)


class _InputQuant:
    """A forward pre-hook that fake-quantizes a module's first input (picklable, deep-copyable)."""

    def __init__(self, qp: Mapping[str, Any]) -> None:
        self.qp = dict(qp)

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        # attention takes (query, key, value): quantize every floating input tensor
        return tuple(fake_quantize_activation(a, self.qp)
                     if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def install_input_quant(module: torch.nn.Module, qp: Mapping[str, Any]) -> Any:
    """Fake-quantize ``module``'s input with ``qp`` from now on; returns the removable handle."""
    return module.register_forward_pre_hook(_InputQuant(qp))
