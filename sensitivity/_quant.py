"""Integer weight quantization, shared by the scanner's probes, the executor and the container.

A weight ``w`` of shape (out, ...) at ``bits`` bits becomes integer codes and float32 scales:

- **symmetric, per output channel** (the default): codes ``q`` in ``[-(2**(bits-1) - 1),
  2**(bits-1) - 1]`` and one scale per output channel, ``w ≈ q * scale`` (2 bits → {-1, 0, 1});
- **group-wise** (``group_size`` g): each output row (its values in memory order: a conv's
  in-channels × kernel) is cut into ceil(row / g) groups of g consecutive values, the last one
  possibly shorter, each with its own scale;
- **asymmetric** (``asymmetric=True``): codes ``u`` in ``[0, 2**bits - 1]`` with a zero point ``z``
  per scale, ``w ≈ (u - z) * scale``: all 2**bits levels are used (4 at 2 bits, against 3), over
  the range [min(w, 0), max(w, 0)], so 0 stays exact.

Each scale is chosen from a grid of clipping ratios of the range to minimise the squared rounding
error (at 8 bits this is nearly the full range; at 2-4 bits clipping the outliers lowers the error a
lot). Quantizing quantized weights again returns the same codes (the executor relies on it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sensplan.sensitivity._data import block_spans

#: Bit widths the quantizer supports; 32 in a plan means "kept in float32".
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
#: Group sizes of group-wise scales (values of one output row per scale)
GROUP_SIZES = (32, 64, 128)
#: ``MethodContext.cache`` key where a method leaves, per weight's state-dict key, the ``(codes,
#: scales, zero points)`` it quantized the weight with: the container stores them as they are
INT_CODES = "int_codes"
FLOAT_BITS = 32
_CLIP_GRID = torch.linspace(0.2, 1.0, 33)
_BLOCK_CPU, _BLOCK_ACCEL = 1 << 20, 1 << 26  # elements per block of the clipping search


def qmax(bits: int) -> int:
    return int(2 ** (bits - 1) - 1)


@dataclass(frozen=True)
class QFormat:
    """An integer weight format: ``bits``, ``group_size`` (0: one scale per output row) and
    ``asymmetric`` (a zero point per scale)."""

    bits: int
    group_size: int = 0
    asymmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"The 'bits' parameter must be one of {SUPPORTED_BITS}. Got {self.bits!r} instead.")
        if self.group_size not in (0, *GROUP_SIZES):
            raise ValueError(f"The group size must be one of {GROUP_SIZES} (or 0: per output channel). "
                             f"Got {self.group_size!r} instead.")

    @classmethod
    def of(cls, effect_or_setting: Mapping[str, Any]) -> QFormat:
        """From a weight_quant setting (``bits``, ``group``, ``zero_point``) or a merged effect
        (``weight_bits``, ``group_size``, ``zero_point_bits``)."""
        e = effect_or_setting
        if "weight_bits" in e:
            return cls(int(e["weight_bits"]), int(e.get("group_size") or 0), bool(e.get("zero_point_bits")))
        return cls(int(e["bits"]), int(e.get("group") or 0), bool(e.get("zero_point")))


@torch.no_grad()
def quantize(w: torch.Tensor, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes, scales, zero_points)``: int16 codes of ``w``'s shape (signed when symmetric,
    ``[0, 2**bits - 1]`` when asymmetric), float32 scales of shape (out,) per channel or (out,
    groups) group-wise, and the zero points (int16, the scales' shape) or None when symmetric."""
    if fmt.group_size == 0 and not fmt.asymmetric:
        q, s = quantize_per_channel(w, fmt.bits)
        return q.to(torch.int16), s, None
    wf = w.detach().float().reshape(w.shape[0], -1)
    rows, cols = wf.shape
    g = fmt.group_size or max(1, cols)
    groups = -(-cols // g)
    pad = groups * g - cols
    if pad:  # the last group is shorter: zeros change no range and round to 0 exactly (no error)
        wf = torch.nn.functional.pad(wf, (0, pad))
    flat = wf.reshape(rows * groups, g)
    if fmt.asymmetric:
        q, s, z = _search_asymmetric(flat, fmt.bits)
    else:
        q8, s = quantize_per_channel(flat, fmt.bits)
        q, z = q8.to(torch.int16), None
    q = q.reshape(rows, groups * g)[:, :cols].reshape(w.shape)
    shape = (rows,) if fmt.group_size == 0 else (rows, groups)
    return q, s.reshape(shape), None if z is None else z.reshape(shape)


def dequantize_codes(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                     group_size: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``(q - z) * s`` per scale, in ``q``'s shape. One scale per row
    broadcasts over the row; group-wise ones are spread over their groups' columns."""
    rows = q.shape[0]
    qf = q.float().reshape(rows, -1)
    s = scales.float().reshape(rows, -1)
    z = None if zero_points is None else zero_points.float().reshape(rows, -1)
    if group_size:
        idx = torch.arange(qf.shape[1], device=q.device) // group_size
        s, z = s[:, idx], None if z is None else z[:, idx]
    if z is not None:
        qf = qf - z
    return (qf * s).reshape(q.shape).to(dtype)


@torch.no_grad()
def _search_asymmetric(wf: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``wf``: the clipping of [min(w, 0), max(w, 0)] with the least squared error, its
    codes in [0, 2**bits - 1], scale and zero point (blocked over rows like the symmetric search)."""
    levels = 2 ** bits - 1
    lo0 = wf.amin(dim=1).clamp(max=0.0)
    hi0 = wf.amax(dim=1).clamp(min=0.0)
    span = (hi0 - lo0).clamp_min(1e-12)
    best_err = torch.full_like(span, float("inf"))
    best_s, best_z = span / levels, torch.zeros_like(span)
    n, cols = wf.shape
    spans = block_spans(n, max(2, (_BLOCK_CPU if wf.device.type == "cpu" else _BLOCK_ACCEL) // max(1, cols)))
    for r0, r1 in spans:
        blk = wf[r0:r1]
        for ratio in _CLIP_GRID:
            s = _short_mantissa(span[r0:r1] * ratio / levels).unsqueeze(1)
            z = torch.clamp(torch.round(-lo0[r0:r1].unsqueeze(1) * ratio / s), 0, levels)
            u = torch.clamp(torch.round(blk / s) + z, 0, levels)
            err = ((u - z) * s - blk).square().sum(dim=1)
            better = err < best_err[r0:r1]
            best_err[r0:r1] = torch.where(better, err, best_err[r0:r1])
            best_s[r0:r1] = torch.where(better, s.squeeze(1), best_s[r0:r1])
            best_z[r0:r1] = torch.where(better, z.squeeze(1), best_z[r0:r1])
    u = torch.clamp(torch.round(wf / best_s.unsqueeze(1)) + best_z.unsqueeze(1), 0, levels)
    return u.to(torch.int16), best_s.float(), best_z.to(torch.int16)


def _short_mantissa(s: torch.Tensor) -> torch.Tensor:
    """Positive float32 ``s`` rounded to 15 mantissa bits: then (code - zero point) * s is exact in
    float32 (a code has at most 8 bits), so quantizing dequantized weights again finds the same
    scale exactly (the container re-quantizes what the executor left). The rounding is 2**-16."""
    bits = s.float().contiguous().view(torch.int32)
    return ((bits + (1 << 7)) & ~((1 << 8) - 1)).view(torch.float32)


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
    """Symmetric codes with one scale per output channel, as floats (:func:`dequantize_codes`)."""
    return dequantize_codes(q, scale, None, 0, dtype)


def fake_quantize(w: torch.Tensor, bits: int | QFormat) -> torch.Tensor:
    """``w`` rounded to ``bits`` bits per channel (or to a :class:`QFormat`) and returned in ``w``'s
    dtype (a new tensor)."""
    fmt = bits if isinstance(bits, QFormat) else QFormat(bits)
    q, s, z = quantize(w, fmt)
    return dequantize_codes(q, s, z, fmt.group_size, w.dtype)


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
    if x.requires_grad and torch.is_grad_enabled():
        q = torch.clamp(torch.round(x / scale) + zp, 0, levels)
        return ((q - zp) * scale).to(x.dtype)
    # the same operations in place on one new tensor (bit-identical, about half the time)
    q = x / scale
    q.round_().add_(zp).clamp_(0, levels).sub_(zp).mul_(scale)
    return q.to(x.dtype)


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


def remove_input_quant_(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Remove every input fake-quantization of ``model`` (in place); returns the parameters each
    module had (bits, scale, zero point), e.g. to hand them to an integer runtime."""
    params: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        for key, hook in list(mod._forward_pre_hooks.items()):
            if isinstance(hook, _InputQuant):
                params[name] = dict(hook.qp)
                del mod._forward_pre_hooks[key]
    return params
