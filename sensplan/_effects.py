"""The cost vocabulary shared by the planner (prediction) and the container (measurement).

A compression *option* on a unit declares its *effect* as plain data (stored in ``scan.json``), so
the planner and the report never need the method's code, and a new method whose effect fits this
vocabulary needs no change anywhere else. The fields of a layer's merged effect:

``weight_bits`` (int, default 32)
    bits per stored weight value (32 float32, 16 float16/bfloat16, 2..8 integer codes).
``weight_dtype`` ("float32" | "float16" | "bfloat16" | "int")
    how the values are stored; "int" adds ``scale_bits`` (plus ``zero_point_bits``) per scale: one
    per output row, or per group of ``group_size`` values of a row.
``scale_bits`` (int, default 0)
    bits of one scale of integer codes (a float32 scale: 32).
``group_size`` (int, default 0)
    0: one scale per output row; g: one per g consecutive values of a row (ceil(row / g) per row,
    the row as pruning leaves it: a conv's kept in-channels × kernel).
``zero_point_bits`` (int, default 0)
    bits of one zero point per scale (asymmetric integer codes); 0: symmetric, no zero point.
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
``structure`` (a :class:`~sensplan._expr.Structure` as data, default none)
    what a restructured layer stores and computes instead of its one weight (e.g. low-rank
    factorization: two thinner weights), as expressions of the layer's pruned dims. Value fields
    (bits, density) then apply to each stored tensor.

The value fields are the container's storage vocabulary: they say how ``model.sensplan`` encodes a
weight, so a new storage format is a container feature. A method that changes *what* is stored
needs no new field: it describes it with ``structure``.

Pruning makes a weight's size an affine function ``a * numel + b * rows + c`` of its element count and
row count, whose coefficients depend only on the layer's other options. :func:`weight_coefficients`
returns them; the planner expands ``numel`` (multilinear in the groups' removed channels) exactly.
MACs are not changed by sparsity: dense kernels do not skip zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sensplan._expr import Expr, Structure, dims, parse_structure

FLOAT_BITS = 32
#: Fields a layer option may set, with their defaults (no compression).
LAYER_DEFAULTS: dict[str, Any] = {"weight_bits": FLOAT_BITS, "weight_dtype": "float32",
                                  "scale_bits": 0, "group_size": 0, "zero_point_bits": 0,
                                  "density": 1.0, "sparse_format": "dense",
                                  "nm": None, "act_bits": FLOAT_BITS, "structure": None}
KNOWN_FIELDS = frozenset(LAYER_DEFAULTS) | {"removed"}
ROW_POINTER_BITS = 32


def merge(effects: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The layer's effect when several options apply (later fields win; disjoint axes in practice).
    Two options that both restructure the layer raise ``ValueError``: one structure per layer."""
    out = dict(LAYER_DEFAULTS)
    for e in effects:
        unknown = set(e) - KNOWN_FIELDS
        if unknown:
            raise ValueError(f"Unknown effect field(s) {sorted(unknown)}; known: {sorted(KNOWN_FIELDS)}.")
        if e.get("structure") is not None and out["structure"] is not None:
            raise ValueError("Two options restructure the same layer; a layer takes one structure.")
        out.update({k: v for k, v in e.items() if k != "removed" and (k != "structure" or v is not None)})
    return out


def merge_per_unit(choices: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per layer, the merged effect of its chosen options, from ``(layer, effect)`` pairs (layers
    with no option chosen are absent). The planner and the executor both use this."""
    per: dict[str, list[Mapping[str, Any]]] = {}
    for unit, effect in choices:
        per.setdefault(unit, []).append(effect)
    return {u: merge(effs) for u, effs in per.items()}


def to_data(effect: Mapping[str, Any]) -> dict[str, Any]:
    """An effect as a method returned it, as the plain JSON data ``scan.json`` stores: a
    :class:`~sensplan._expr.Structure` becomes its data; every field is checked."""
    out = {k: (v.to_data() if isinstance(v, Structure) else v) for k, v in effect.items()}
    merge([out])  # unknown fields raise ValueError
    if out.get("structure") is not None:
        parse_structure(out["structure"])
    return out


@dataclass(frozen=True)
class UnitInfo:
    """What a method sees of a unit when it states a setting's effect (``Method.effect``).

    ``kind`` is "layer" or "group". A layer has its weight ``shape`` (as scanned, before any
    pruning), its ``type`` (class name) and ``macs`` per sample; :attr:`dims` are the expression
    variables of that shape as pruning leaves it (``d0`` output channels, ``d1`` inputs per group,
    then the kernel). A group has its ``channels`` and ``channel_step``.
    """

    name: str
    kind: str
    shape: tuple[int, ...] = ()
    type: str = ""
    macs: int = 0
    channels: int = 0
    channel_step: int = 1

    @property
    def dims(self) -> tuple[Expr, ...]:
        return dims(len(self.shape))

    @property
    def macs_per_weight(self) -> float:
        """MACs per sample per weight value of the original layer (a conv's output positions)."""
        return float(self.macs) / max(1, math.prod(self.shape) if self.shape else 1)

    @classmethod
    def of_layer(cls, name: str, info: Mapping[str, Any]) -> UnitInfo:
        """From a ``layers`` entry of the scan table."""
        return cls(name, "layer", tuple(int(s) for s in info["weight_shape"]), str(info.get("type", "")),
                   int(info.get("macs", 0)))

    @classmethod
    def of_group(cls, name: str, info: Mapping[str, Any]) -> UnitInfo:
        """From a ``groups`` entry of the scan table."""
        return cls(name, "group", channels=int(info["channels"]),
                   channel_step=int(info.get("channel_step", 1)))


def row_length(shape: Sequence[int]) -> int:
    """Values per output row of a weight of ``shape`` (the CSR index width and the "auto" layout
    are decided on it, from the original shape)."""
    return int(math.prod(shape[1:])) if len(shape) > 1 else 1


def index_bits(row_len: int) -> int:
    """CSR column-index width for rows of ``row_len`` values."""
    return 16 if row_len <= 65536 else 32


def is_sparse(effect: Mapping[str, Any]) -> bool:
    """Whether an option keeps only some of a weight's values (a density below 1, or a sparse format)."""
    return float(effect.get("density", 1.0)) < 1.0 or effect.get("sparse_format") not in (None, "dense")


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


def scale_bits_each(effect: Mapping[str, Any]) -> float:
    """Bits of one scale with its zero point (integer codes), else 0."""
    if effect.get("weight_dtype") != "int":
        return 0.0
    return float(effect.get("scale_bits", 0)) + float(effect.get("zero_point_bits", 0) or 0)


def weight_coefficients(effect: Mapping[str, Any], row_len: int) -> tuple[float, float, float]:
    """``(a, b, c)`` with stored bits = ``a * numel + b * rows + c`` for a weight with this effect,
    group-wise scales left out (``scale_bits_each`` × Σ rows × ceil(row / group_size), priced by the
    planner from the layer's pruned dims)."""
    wb = int(effect.get("weight_bits", FLOAT_BITS))
    scale = scale_bits_each(effect) if not int(effect.get("group_size", 0) or 0) else 0.0
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


def n_remove_for(ratio: float, channels: int, step: int = 1, round_to: int = 1) -> int:
    """Channels removed at ``ratio`` of a group of ``channels``: round half up, at least one kept.

    With ``step`` > 1 (a group holding a grouped convolution or a GroupNorm: the same positions go
    from each of ``step`` equal chunks) the rounding is per chunk and the count a multiple of
    ``step``, e.g. ``n_remove_for(0.3, 64, step=4) == 20`` (5 of each chunk of 16).

    With ``round_to`` > 1 (``scan --round-to``: widths kernels like, e.g. 8 or 16) the channels
    *kept* are the nearest multiple of ``round_to`` (at least ``round_to``; none removed when that
    is the whole group), e.g. ``n_remove_for(0.3, 64, round_to=8) == 16`` (48 kept, not 45). With
    both, the channels kept are a multiple of each (of their least common multiple: a grouped
    convolution's odd widths are its slowest, e.g. ``n_remove_for(0.5, 400, step=25, round_to=8) ==
    200``), and none are removed where no such multiple lies below ``channels``."""
    k = _n_remove(ratio, channels, step)
    if round_to > 1 and k:
        unit = math.lcm(round_to, step)
        kept = max(unit, int(math.floor((channels - k) / unit + 0.5)) * unit)
        return 0 if kept >= channels else channels - kept
    return k


def _n_remove(ratio: float, channels: int, step: int) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"The 'ratio' parameter must be a float in the range [0.0, 1.0). Got {ratio!r} "
                         f"instead.")
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"The 'step' parameter must be a positive integer. Got {step!r} instead.")
    per = channels // step
    return step * max(0, min(per - 1, int(math.floor(ratio * per + 0.5))))
