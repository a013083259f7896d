"""The cost vocabulary shared by the planner (prediction) and the container (measurement).

A compression *option* on a unit declares its *effect* as plain data (stored in ``scan.json``), so
the planner and the report never need the method's code, and a new method whose effect fits this
vocabulary needs no change anywhere else. The fields of a layer's merged effect:

``weight_bits`` (int, default 32)
    bits per stored weight value (32 float32, 16 float16/bfloat16, 2..8 integer codes).
``weight_dtype`` ("float32" | "float16" | "bfloat16" | "int")
    how the values are stored; "int" adds ``scale_bits`` per output row (one scale per channel).
``scale_bits`` (int, default 0)
    per-output-row overhead of integer codes (a float32 scale: 32).
``density`` (float in (0, 1], default 1)
    the fraction of weight values kept (non-zero).
``sparse_format`` ("dense" | "auto" | "nm")
    "auto": the smaller of a bitmask (1 bit per position) and CSR (per kept value a column index of
    16 bits, 32 for rows longer than 65,536, plus one int32 row pointer per row and one extra);
    "nm": N:M semi-structured (``nm = [N, M]``; per kept value ceil(log2 M) bits of metadata).
``act_bits`` (int, default 32)
    bits of the layer's input activations (used by BOPs).
``removed`` (int)
    channels removed from a channel group (the only effect of a ``group`` unit).

Pruning makes a weight's size an affine function ``a * numel + b * rows + c`` of its element count and
row count, whose coefficients depend only on the layer's other options. :func:`weight_coefficients`
returns them; the planner expands ``numel`` (multilinear in the groups' removed channels) exactly.
MACs are not changed by sparsity: dense kernels do not skip zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

FLOAT_BITS = 32
#: Fields a layer option may set, with their defaults (no compression).
LAYER_DEFAULTS: dict[str, Any] = {"weight_bits": FLOAT_BITS, "weight_dtype": "float32",
                                  "scale_bits": 0, "density": 1.0, "sparse_format": "dense",
                                  "nm": None, "act_bits": FLOAT_BITS}
KNOWN_FIELDS = frozenset(LAYER_DEFAULTS) | {"removed"}
ROW_POINTER_BITS = 32


def merge(effects: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The layer's effect when several options apply (later fields win; disjoint axes in practice)."""
    out = dict(LAYER_DEFAULTS)
    for e in effects:
        unknown = set(e) - KNOWN_FIELDS
        if unknown:
            raise ValueError(f"Unknown effect field(s) {sorted(unknown)}; known: {sorted(KNOWN_FIELDS)}.")
        out.update({k: v for k, v in e.items() if k != "removed"})
    return out


def index_bits(row_len: int) -> int:
    """CSR column-index width for rows of ``row_len`` values."""
    return 16 if row_len <= 65536 else 32


def sparse_layout(effect: Mapping[str, Any], row_len: int) -> str:
    """The stored layout of a weight: "dense", "bitmask", "csr" or "nm".

    "auto" picks by bits per position (``1 + d*b`` for a bitmask, ``d*(b + index)`` for CSR); the
    container uses this same rule, so predicted and measured sizes agree.
    """
    fmt = effect.get("sparse_format", "dense")
    d = float(effect.get("density", 1.0))
    if fmt == "dense" or d >= 1.0:
        return "dense"
    if fmt == "nm":
        return "nm"
    b = int(effect.get("weight_bits", FLOAT_BITS))
    return "bitmask" if 1 + d * b <= d * (b + index_bits(row_len)) else "csr"


def weight_coefficients(effect: Mapping[str, Any], row_len: int) -> tuple[float, float, float]:
    """``(a, b, c)`` with stored bits = ``a * numel + b * rows + c`` for a weight with this effect."""
    wb = int(effect.get("weight_bits", FLOAT_BITS))
    scale = float(effect.get("scale_bits", 0)) if effect.get("weight_dtype") == "int" else 0.0
    d = float(effect.get("density", 1.0))
    layout = sparse_layout(effect, row_len)
    if layout == "dense":
        return float(wb), scale, 0.0
    if layout == "nm":
        n, m = effect["nm"]
        meta = math.ceil(math.log2(m))
        return n / m * (wb + meta), scale, 0.0
    if layout == "bitmask":
        return 1.0 + d * wb, scale, 0.0
    return d * (wb + index_bits(row_len)), scale + ROW_POINTER_BITS, float(ROW_POINTER_BITS)


def kept_values(numel: int, density: float) -> int:
    """Values a magnitude-sparsity mask at ``density`` keeps of ``numel`` (round half up, >= 1)."""
    return max(1, min(numel, int(math.floor(density * numel + 0.5))))


def n_remove_for(ratio: float, channels: int, step: int = 1) -> int:
    """Channels removed at ``ratio`` of a group of ``channels``: round half up, at least one kept.

    With ``step`` > 1 (a group holding a grouped convolution or a GroupNorm: the same positions go
    from each of ``step`` equal chunks) the rounding is per chunk and the count a multiple of
    ``step``, e.g. ``n_remove_for(0.3, 64, step=4) == 20`` (5 of each chunk of 16)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"The 'ratio' parameter must be a float in the range [0.0, 1.0). Got {ratio!r} "
                         f"instead.")
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"The 'step' parameter must be a positive integer. Got {step!r} instead.")
    per = channels // step
    return step * max(0, min(per - 1, int(math.floor(ratio * per + 0.5))))
