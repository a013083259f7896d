"""Decision blocks and cost models, computed from files alone (numpy only: no torch, no model).

A *block* is one decision: a unit (a layer or a channel group) on one *axis* (``channels``,
``weight``, ``sparsity``, ``activation``, ...). Its options are "none" plus every scanned option of
every method on that axis; a choice picks one option per block. Each option carries its measured
drop and its cost *effect* (see :mod:`sensplan._effects`).

Cost models turn choices into costs. Each is a sum of *terms*, each depending on a few blocks only,
so the MILP stays exact (see ``_solver``):

- :class:`AnalyticCosts` (built in): ``size`` in bytes (packed codes, scales, sparse formats),
  ``macs`` per sample (Conv/Linear), ``bops`` (MACs x weight bits x activation bits) and ``params``,
  computed from the tensor shapes the scan recorded;
- :class:`TableCosts`: a measured table (unit x option -> cost, plus a fixed overhead) read from a
  documented JSON file, e.g. per-layer latency measured on a runtime (see docs/formats.md).

Pruning shrinks tensors additively: a dim shared by several groups (a concatenation) loses the sum
of what each group removes. A tensor's element count is a product over dims of such sums; it is
expanded into monomials with at most one group per dim, each an exact term.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sensplan._effects import (
    LAYER_DEFAULTS,
    merge,
    merge_per_unit,
    row_length,
    scale_bits_each,
    weight_coefficients,
)
from sensplan._errors import ArtifactError, UserInputError, first_line
from sensplan._expr import Expr, ParsedStructure, ceil, const, default_structure, parse_structure
from sensplan._registry import Registry
from sensplan.planner._signal import AUTO, DROP, FISHER, DropMap

ANALYTIC_METRICS = ("size", "macs", "bops", "params", "bits")
#: kept for the public API: the built-in cost metrics
METRICS = ANALYTIC_METRICS
COST_TABLE_FORMAT = "sensplan.cost_table"
NONE = "none"


@dataclass(frozen=True)
class Option:
    """One option of a block: ``method`` (None for no compression), its ``setting``, display
    ``label``, cost ``effect``, strength ``level`` and the measured ``drop``/``loss_increase``."""

    method: str | None
    setting: Mapping[str, Any]
    label: str
    effect: Mapping[str, Any]
    level: float = 0.0
    drop: float = 0.0
    drop_se: float = 0.0
    loss_increase: float = 0.0
    #: the scan's low-noise signals of this probe: name -> (value, paired standard error)
    signals: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    #: a fast scan estimated it (no measured drop); ``map_point``: estimated, then measured
    estimated: bool = False
    map_point: bool = False
    #: options of one method and family are nested (the envelope compares only those)
    family: str = ""

    @property
    def key(self) -> str:
        """Canonical identity: ``method:{setting json}`` or ``none``."""
        if self.method is None:
            return NONE
        return f"{self.method}:{json.dumps(dict(self.setting), sort_keys=True, separators=(',', ':'))}"


@dataclass(frozen=True)
class Block:
    """A decision on ``unit`` along ``axis``; ``kind`` is "group" or "layer"; option 0 is none."""

    unit: str
    axis: str
    kind: str
    options: tuple[Option, ...]
    channels: int = 0
    channel_step: int = 1  # a group's channels go in multiples of this (grouped convs, GroupNorm)
    round_to: int = 1  # a group's kept width is a multiple of this (scan --round-to)

    @property
    def name(self) -> str:
        return f"{self.axis}:{self.unit}"


def option_key(method: str | None, setting: Mapping[str, Any]) -> str:
    return Option(method, setting, "", {}).key


def blocks_from_scan(scan: Any) -> list[Block]:
    """One block per (unit, axis) with results, options ordered by method then strength."""
    kinds = {name: m.get("unit_kind", "layer") for name, m in scan.methods.items()}
    order = {name: i for i, name in enumerate(scan.methods)}
    by_block: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in scan.results:
        by_block.setdefault((r["unit"], r["axis"]), []).append(r)
    blocks = []
    for (unit, axis), rows in by_block.items():
        rows = sorted(rows, key=lambda r: (order.get(r["method"], 99), float(r.get("level", 0.0))))
        kind = kinds.get(rows[0]["method"], "layer")
        opts = [Option(None, {}, "none", {})]
        opts += [Option(r["method"], dict(r["setting"]), str(r.get("label", r["method"])),
                        dict(r.get("effect", {})), float(r.get("level", 0.0)), _number(r["drop"]),
                        float(r.get("drop_se", 0.0) or 0.0), float(r.get("loss_increase") or 0.0),
                        {k: (float(v.get("value") or 0.0), float(v.get("se") or 0.0))
                         for k, v in (r.get("signals") or {}).items()},
                        bool(r.get("estimated")), bool(r.get("map_point")), str(r.get("family") or ""))
                 for r in rows]
        channels = int(scan.groups[unit]["channels"]) if kind == "group" and unit in scan.groups else 0
        info = scan.groups.get(unit, {}) if kind == "group" else {}
        step, round_to = int(info.get("channel_step", 1)), int(info.get("round_to", 1))
        blocks.append(Block(unit, axis, kind, tuple(opts), channels, step, round_to))
    # groups first (they shape the tensors), then layers, each in the scan's unit order
    unit_order = {u: i for i, u in enumerate([*scan.groups, *scan.layers])}
    blocks.sort(key=lambda b: (b.kind != "group", unit_order.get(b.unit, 10**9), b.axis))
    return blocks


@dataclass(frozen=True)
class Term:
    """Cost that depends on ``factors`` (block indices): ``table[i, j, ...]`` for their options."""

    factors: tuple[int, ...]
    table: np.ndarray


class CostModel(Protocol):
    """A cost-model plug-in: which metrics it provides and their terms over the blocks."""

    metrics: tuple[str, ...]

    def terms(self, blocks: Sequence[Block]) -> dict[str, list[Term]]: ...

    def describe(self) -> dict[str, Any]: ...


def _reduce(factors: tuple[int, ...], table: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Drop the factors the table does not depend on, and sort the rest."""
    keep = []
    for ax in range(table.ndim):
        if np.ptp(table, axis=ax).max(initial=0.0) > 0:
            keep.append(ax)
    drop_axes = tuple(a for a in range(table.ndim) if a not in keep)
    t = table
    for ax in sorted(drop_axes, reverse=True):
        t = np.take(t, 0, axis=ax)
    fs = [factors[a] for a in keep]
    perm = np.argsort(fs)
    return tuple(fs[i] for i in perm), np.transpose(t, perm) if t.ndim > 1 else t


class _Acc:
    def __init__(self) -> None:
        self.terms: dict[tuple[int, ...], np.ndarray] = {}

    def add(self, factors: tuple[int, ...], table: np.ndarray) -> None:
        factors, table = _reduce(factors, table)
        if factors in self.terms:
            self.terms[factors] = self.terms[factors] + table
        else:
            self.terms[factors] = np.array(table, dtype=float)

    def result(self) -> list[Term]:
        return [Term(f, t) for f, t in self.terms.items()]


#: the most table entries one tensor's joint pricing may take (groups sharing a dim, tabulated
#: together because a restructured layer's cost is not linear in that dim); beyond it the option
#: is left out of the plan with the reason
JOINT_LIMIT = 200_000


@dataclass(frozen=True)
class _Tensor:
    """One state-dict tensor as the analytic costs see it: its scanned ``shape``, the groups that
    shrink each dim (``dims[d]``: (group block, elements per channel)), and, for a layer's weight,
    the ``layer``, its own blocks ``local`` and its original ``macs``."""

    key: str
    shape: tuple[int, ...]
    dims: tuple[tuple[tuple[int, float], ...], ...]
    storage_bits: float
    is_param: bool
    layer: str | None = None
    local: tuple[int, ...] = ()
    macs: float = 0.0
    #: 1 / (the original number of weights of the layers in scope) for a weight in scope, else 0:
    #: its stored bits times this are its share of the mean bits per weight (``bits``)
    per_weight: float = 0.0
    #: False for a tensor that is the same memory as an earlier one (``tied_to``: a tied LM head):
    #: it computes (MACs, BOPs) but is stored and counted once, under the earlier key
    stored: bool = True

    @property
    def multi(self) -> tuple[int, ...]:
        """Dims shared by several groups (a concatenation): each group removes its own channels."""
        return tuple(d for d, gs in enumerate(self.dims) if len(gs) > 1)


def scope_weights(scan: Any) -> int:
    """The original number of weights of the layers in scope (every scanned layer a model does not
    leave out of scope, such as an output head): the denominator of ``bits``."""
    return sum(math.prod(int(s) for s in v["weight_shape"]) for v in scan.layers.values()
               if not v.get("out_of_scope"))


def _per_weight(scan: Any, layer: str | None, total: int) -> float:
    return 1.0 / total if layer is not None and total and not scan.layers[layer].get("out_of_scope") else 0.0


def _tensors(scan: Any, blocks: Sequence[Block]) -> list[_Tensor]:
    group_block = {b.unit: i for i, b in enumerate(blocks) if b.kind == "group"}
    local: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        if b.kind == "layer":
            local.setdefault(b.unit, []).append(i)
    out = []
    total = scope_weights(scan)
    for key, t in scan.tensors.items():
        per_dim: list[list[tuple[int, float]]] = [[] for _ in t["shape"]]
        for gid, dims in t["shrinks"].items():
            if gid in group_block and isinstance(dims, Mapping):
                for d, per in dims.items():
                    if per:
                        per_dim[int(d)].append((group_block[gid], float(per)))
        out.append(_tensor_of(scan, key, t, tuple(tuple(g) for g in per_dim), local, total))
    return out


def _tensor_of(scan: Any, key: str, t: Mapping[str, Any], dims: tuple[tuple[tuple[int, float], ...], ...],
               local: Mapping[str, Sequence[int]], total: int) -> _Tensor:
    """The scan's tensor ``key`` as the pricing sees it, with the groups that shrink its dims and,
    for a layer's weight, the layer's own blocks (``local``); ``total``: :func:`scope_weights`."""
    layer = t.get("layer")
    layer = str(layer) if layer is not None and layer in scan.layers else None
    return _Tensor(key, tuple(int(s) for s in t["shape"]), dims, float(t["storage_bits"]),
                   t.get("kind", "parameter") == "parameter", layer,
                   tuple(local.get(layer, ())) if layer is not None else (),
                   float(scan.layers[layer]["macs"]) if layer is not None else 0.0,
                   _per_weight(scan, layer, total), not t.get("tied_to"))


class _Pricing:
    """The one description of what a tensor costs: :meth:`costs` maps its pruned dims (numbers or
    arrays, broadcast) and the merged effect of its layer's options to size (bytes), params, MACs
    and BOPs. The MILP's terms tabulate it over many effects (:meth:`metrics`);
    :meth:`AnalyticCosts.direct` evaluates it at one point."""

    def __init__(self, t: _Tensor) -> None:
        self.t = t
        self._structures: dict[str, tuple[ParsedStructure, Expr, Expr]] = {}
        self._scales: dict[tuple[str, int], Expr] = {}

    def structure(self, effect: Mapping[str, Any]) -> tuple[ParsedStructure, Expr, Expr]:
        """The layer's structure under ``effect``, with its stored values and rows as expressions."""
        data = effect.get("structure")
        key = "" if data is None else json.dumps(data, sort_keys=True)
        if key not in self._structures:
            st = default_structure(self.t.shape, self.t.macs) if data is None else parse_structure(data)
            self._structures[key] = (st, st.numel(), st.rows())
        return self._structures[key]

    def group_scales(self, effect: Mapping[str, Any]) -> Expr | None:
        """The number of group-wise scales the layer stores under ``effect`` (Σ rows × ceil(cols /
        group_size) over its stored tensors), or None without group-wise integer codes."""
        g = int(effect.get("group_size", 0) or 0)
        if not g or effect.get("weight_dtype") != "int":
            return None
        data = effect.get("structure")
        key = ("" if data is None else json.dumps(data, sort_keys=True), g)
        if key not in self._scales:
            st = self.structure(effect)[0]
            total = const(0)
            for rows, cols in st.tensors:
                total = total + rows * ceil(cols / g)
            self._scales[key] = total
        return self._scales[key]

    def costs(self, env: Mapping[str, Any], effect: Mapping[str, Any]) -> dict[str, Any]:
        """Every metric at the pruned dims ``env`` under the merged ``effect`` (numbers or arrays)."""
        t = self.t
        if t.layer is None:
            numel = _numel(env, len(t.shape))
            kept = numel if t.stored else 0.0 * numel
            return {"size": kept * t.storage_bits / 8, "params": kept if t.is_param else 0.0 * numel,
                    "macs": 0.0 * numel, "bops": 0.0 * numel, "bits": 0.0 * numel}
        st, numel_expr, rows_expr = self.structure(effect)
        numel, rows, macs = numel_expr.evaluate(env), rows_expr.evaluate(env), st.macs.evaluate(env)
        a, b, c = weight_coefficients(effect, row_length(t.shape))
        scales = self.group_scales(effect)
        extra = 0.0 if scales is None else scale_bits_each(effect) * scales.evaluate(env)
        bits = (a * numel + b * rows + c * len(st.tensors) + extra) * (1.0 if t.stored else 0.0)
        return {"size": bits / 8, "params": numel * (1.0 if t.is_param and t.stored else 0.0), "macs": macs,
                "bops": macs * float(effect["weight_bits"]) * float(effect["act_bits"]),
                "bits": bits * t.per_weight}

    def metrics(self, env: Mapping[str, Any], effects: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Per metric, an array with a leading axis over ``effects`` (one merged effect each)."""
        per = [self.costs(env, e) for e in (effects if self.t.layer is not None else effects[:1])]
        return {m: np.stack(np.broadcast_arrays(*[np.asarray(c[m], dtype=float) for c in per]))
                for m in ANALYTIC_METRICS}

    def linear_in(self, effect: Mapping[str, Any], d: int) -> bool:
        """Whether the cost is linear in dim ``d`` (then a dim shared by several groups is priced
        exactly by expanding the product, each term over one of its groups)."""
        st, numel, rows = self.structure(effect)
        name = f"d{d}"
        scales = self.group_scales(effect)
        return all(x.degree(name) <= 1 for x in (numel, rows, st.macs, *([scales] if scales is not None else [])))


def _numel(env: Mapping[str, Any], n: int) -> Any:
    out: Any = 1.0
    for d in range(n):
        out = out * env[f"d{d}"]
    return out


def _pricing_merge(effects: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``merge``, keeping the first of two structures: such a pair is never chosen (the planner
    forbids it), but the MILP's tables need a finite cost for every combination."""
    kept: list[Mapping[str, Any]] = []
    structured = False
    for e in effects:
        if e.get("structure") is not None:
            if structured:
                e = {k: v for k, v in e.items() if k != "structure"}
            structured = True
        kept.append(e)
    return merge(kept)


class AnalyticCosts:
    """Size (bytes), MACs, BOPs and parameters from the scan's tensor shapes (exact).

    Every tensor is priced by one function of its pruned dims and its layer's options
    (:class:`_Pricing`): a restructured layer (an option whose effect has a ``structure``) by the
    expressions its method recorded, any other by its element and row counts. The MILP's terms
    tabulate that function over the options of the groups that shrink the tensor; a dim shared by
    several groups (a concatenation) is expanded into one term per group where the cost is linear
    in it, and tabulated over the groups jointly where it is not. :meth:`direct` evaluates the same
    function at any channel counts. Example::

        cm = Costs(scan)                  # AnalyticCosts is always included
        cm.evaluate(cm.no_compression())["macs"] == cm.original["macs"]
    """

    metrics: tuple[str, ...] = ANALYTIC_METRICS

    def __init__(self, scan: Any) -> None:
        self.scan = scan
        self._pricings: list[tuple[_Tensor, _Pricing, list[tuple[str, int, float]]]] | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": "analytic", "metrics": list(self.metrics),
                "units": {"size": "bytes", "macs": "per sample", "bops": "per sample",
                          "params": "count", "bits": "stored bits per original weight of the layers in scope"}}

    # -- the MILP's terms -----------------------------------------------------------------------------
    def terms(self, blocks: Sequence[Block]) -> dict[str, list[Term]]:
        acc = {m: _Acc() for m in self.metrics}
        for t in _tensors(self.scan, blocks):
            pricing = _Pricing(t)
            combos, effects = _local_effects(blocks, t.local)
            joint = bool(t.multi) and not all(pricing.linear_in(e, d) for e in effects for d in t.multi)
            grid = _grid(t, joint)
            expand = () if joint else t.multi
            local_shape = [len(blocks[i].options) for i in t.local]
            corners = {r: self._table(pricing, blocks, t, grid, expand, effects, local_shape,
                                      dict.fromkeys(r, 1.0)) for r in _subsets(expand)}
            factors = (*grid, *t.local)
            for sub in _subsets(expand):
                # the coefficient of the product of the removals over ``sub``'s dims (multilinear)
                beta = {m: _difference([corners[r][m] for r in _subsets(sub)],
                                       [len(sub) - len(r) for r in _subsets(sub)]) for m in self.metrics}
                for picks in itertools.product(*[t.dims[d] for d in sub]):
                    # the product over sub's dims of the removed elements, one group per dim
                    vecs = [(bi, np.array([float(o.effect.get("removed", 0)) for o in blocks[bi].options]) * p)
                            for bi, p in picks]
                    for m in self.metrics:
                        acc[m].add(*_times(factors, beta[m], vecs))
        return {m: a.result() for m, a in acc.items()}

    @staticmethod
    def _table(pricing: _Pricing, blocks: Sequence[Block], t: _Tensor, grid: Sequence[int],
               expand: Sequence[int], effects: Sequence[Mapping[str, Any]], local_shape: Sequence[int],
               removed: Mapping[int, float]) -> dict[str, np.ndarray]:
        """The tensor's metrics over (grid blocks' options, its layer's options), with ``removed``
        elements taken from the expanded dims (a corner of their expansion). A grid block shrinks
        only the dims that are not expanded: an expanded dim's removals, its own included, come in
        through the expansion's terms (counted here too, they were taken twice)."""
        env = {}
        for d, s in enumerate(t.shape):
            v: Any = float(s) - removed.get(d, 0.0)
            for bi, p in t.dims[d]:
                if bi in grid and d not in expand:
                    k = np.array([float(o.effect.get("removed", 0)) for o in blocks[bi].options])
                    shape = [1] * len(grid)
                    shape[list(grid).index(bi)] = len(k)
                    v = v - k.reshape(shape) * p
            env[f"d{d}"] = v if np.ndim(v) else np.full([1] * len(grid), v) if grid else v
        grid_shape = [len(blocks[bi].options) for bi in grid]
        out = {}
        for m, arr in pricing.metrics(env, effects).items():
            full = np.broadcast_to(arr, (len(effects), *grid_shape)) if grid else arr.reshape(len(effects))
            full = np.moveaxis(full, 0, -1) if grid else full
            out[m] = np.ascontiguousarray(full).reshape([*grid_shape, *local_shape])
        return out

    def unpriceable(self, blocks: Sequence[Block]) -> dict[tuple[int, int], str]:
        """Options whose cost cannot be priced exactly, with the reason: a restructured layer whose
        cost is not linear in a dim that too many groups share to tabulate them together."""
        out: dict[tuple[int, int], str] = {}
        for t in _tensors(self.scan, blocks):
            if not t.multi or not t.local:
                continue
            pricing = _Pricing(t)
            combos, effects = _local_effects(blocks, t.local)
            entries = math.prod(len(blocks[bi].options) for bi in _grid(t, True)) * len(combos)
            if entries <= JOINT_LIMIT:
                continue
            for i in t.local:
                for o, opt in enumerate(blocks[i].options):
                    if opt.effect.get("structure") is None and not opt.effect.get("group_size"):
                        continue
                    bad = [d for d in t.multi if not pricing.linear_in(merge([opt.effect]), d)]
                    if bad:
                        groups = len(t.dims[bad[0]])
                        out[(i, o)] = (f"its dim {bad[0]} takes channels from {groups} channel groups (a "
                                       f"concatenation) and the {opt.method} cost is not linear in it; "
                                       f"pricing all of them together would take {entries:,} table entries, "
                                       f"so this option is not planned")
        return out

    # -- one choice, any channel counts ---------------------------------------------------------------
    def direct(self, removed: Mapping[str, float], effects: Mapping[str, Mapping[str, Any]]
               ) -> dict[str, float]:
        """Every metric computed tensor by tensor (no terms) when group ``g`` loses ``removed[g]``
        channels (any count) and layer ``l`` has the merged effect ``effects[l]``: the same pricing
        the terms tabulate. Used for the uniform baseline's fine ratio grid, and by the tests to check
        the terms."""
        out = dict.fromkeys(self.metrics, 0.0)
        for tensor, pricing, shrinks in self._direct_pricings():
            shape = [float(s) for s in tensor.shape]
            for gid, d, per in shrinks:
                shape[d] -= float(removed.get(gid, 0)) * per
            env = {f"d{d}": v for d, v in enumerate(shape)}
            effect = merge([effects.get(tensor.layer, {})]) if tensor.layer is not None else {}
            for m, v in pricing.costs(env, effect).items():
                out[m] += float(v)
        return out

    def _direct_pricings(self) -> list[tuple[_Tensor, _Pricing, list[tuple[str, int, float]]]]:
        """Per tensor, its description, its pricing (which caches parsed structures) and the
        (group, dim, elements per channel) that shrink it: built once, used by every ``direct``."""
        if self._pricings is None:
            self._pricings = []
            total = scope_weights(self.scan)
            for key, t in self.scan.tensors.items():
                tensor = _tensor_of(self.scan, key, t, tuple(() for _ in t["shape"]), {}, total)
                shrinks = [(gid, int(d), float(per)) for gid, dims in t["shrinks"].items()
                           for d, per in (dims.items() if isinstance(dims, Mapping) else [])]
                self._pricings.append((tensor, _Pricing(tensor), shrinks))
        return self._pricings


def _local_effects(blocks: Sequence[Block], local: Sequence[int]) -> tuple[list[tuple[int, ...]], list[dict[str, Any]]]:
    """Every combination of a layer's own options (C order) and its merged effect."""
    combos = list(itertools.product(*[range(len(blocks[i].options)) for i in local]))
    return combos, [_pricing_merge(blocks[i].options[o].effect for i, o in zip(local, combo, strict=True))
                    for combo in combos]


def _grid(t: _Tensor, joint: bool) -> tuple[int, ...]:
    """The group blocks a tensor's cost is tabulated over: those of dims with one group, and with
    ``joint`` those of shared dims too."""
    out: list[int] = []
    for gs in t.dims:
        if len(gs) == 1 or joint:
            out.extend(bi for bi, _ in gs if bi not in out)
    return tuple(out)


def _difference(tables: Sequence[np.ndarray], missing: Sequence[int]) -> np.ndarray:
    """The finite difference sum of (-1)^missing * table: a multilinear function's coefficient."""
    out = np.zeros_like(np.asarray(tables[0], dtype=float))
    for t, k in zip(tables, missing, strict=True):
        out = out + (-1.0) ** k * t
    return out


def _subsets(items: Sequence[int]) -> list[tuple[int, ...]]:
    return [c for r in range(len(items) + 1) for c in itertools.combinations(items, r)]


def _times(factors: tuple[int, ...], table: np.ndarray, vecs: Sequence[tuple[int, np.ndarray]]
           ) -> tuple[tuple[int, ...], np.ndarray]:
    """``table`` (over ``factors``) times per-block vectors: along its axis for a block it already
    has, along a new axis for another one (a block may appear several times)."""
    fs = list(factors)
    out = np.asarray(table, dtype=float)
    for bi, v in vecs:
        if bi in fs:
            shape = [1] * out.ndim
            shape[fs.index(bi)] = len(v)
            out = out * v.reshape(shape)
        else:
            fs.append(bi)
            out = out[..., None] * v.reshape((1,) * out.ndim + (len(v),))
    return tuple(fs), out


@dataclass
class TableCosts:
    """A measured cost table: ``metric``, a fixed ``overhead`` and per unit, per option key, the
    unit's cost (the key ``none`` = uncompressed). The total is the overhead plus every unit's cost
    at its chosen option; a unit or option missing from the table costs as ``none`` (or 0). An
    entry is keyed by its unit's name, or by any name with the unit in its ``"unit"`` field (a
    channel group and a layer often share a name: ``"group:stem.0"`` and ``"layer:stem.0"``).

    A *joint* entry prices a cost that depends on several units at once (a layer's time depends on
    the width of the group feeding it and of the group it feeds): ``"factors"``, a list of
    ``[unit, axis]``; ``"options"``, per factor the option keys of its axis (``none`` first); and
    ``"costs"``, a nested list indexed by those options, factor by factor. A factor that no block
    decides stays at ``none``.

    File format (JSON; see docs/formats.md)::

        {"format": "sensplan.cost_table", "schema_version": 1, "metric": "latency_ms",
         "unit": "ms", "overhead": 0.31,
         "entries": {"layer1.0.conv1": {"axis": "channels",
                                        "costs": {"none": 0.12, "prune:{\\"n_remove\\":4,...}": 0.09}}}}
    """

    metric: str
    overhead: float
    entries: Mapping[str, Mapping[str, Any]]
    unit: str = ""
    path: str = ""
    #: how the table was measured (``sensplan profile``: runtime, batch, threads, ...), if known
    profile: Mapping[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = field(init=False)
    #: after :meth:`terms`: the options ("<axis>:<unit> <key>") of a block a joint entry prices
    #: that the entry does not name (they cost as its 'none': a table made from another scan?)
    unpriced: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not self.metric or self.metric in ANALYTIC_METRICS:
            raise ArtifactError(f"A cost table's metric must be a new name (not one of "
                                f"{', '.join(ANALYTIC_METRICS)}). Got {self.metric!r}.")
        self.metrics = (self.metric,)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TableCosts:
        from sensplan._artifacts import read_json

        obj = read_json(path, COST_TABLE_FORMAT, (1,))
        try:
            entries = obj["entries"]
            for e in entries.values():
                if "factors" in e:
                    shape = np.asarray(e["costs"], dtype=float).shape
                    if shape != tuple(len(k) for k in e["options"]) or len(e["factors"]) != len(shape):
                        raise ValueError(f"a joint entry's costs have the shape {shape}, its options "
                                         f"{[len(k) for k in e['options']]}")
                    continue
                for v in e["costs"].values():
                    float(v)
            return cls(str(obj["metric"]), float(obj.get("overhead", 0.0)), entries,
                       str(obj.get("unit", "")), str(Path(path)), dict(obj.get("profile") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{str(path)!r} is not a valid cost table ({type(e).__name__}: {e}). "
                                f"See docs/formats.md for its fields.") from None

    def describe(self) -> dict[str, Any]:
        measured = {k: self.profile[k] for k in ("runtime", "batch", "threads") if k in self.profile}
        return {"name": "table", "metrics": [self.metric], "unit": self.unit, "path": self.path,
                "overhead": self.overhead, **({"measured": measured} if measured else {})}

    @staticmethod
    def _joint(entry: Mapping[str, Any], blocks: Sequence[Block], acc: _Acc, unpriced: list[str] | None = None
               ) -> float:
        """Add a joint entry's term over the blocks of its factors; returns 0, or the entry's
        constant value when no block decides any of its factors."""
        table = np.asarray(entry["costs"], dtype=float)
        factors: list[int] = []
        for d, ((unit, axis), keys) in enumerate(zip(entry["factors"], entry["options"], strict=True)):
            pos = {k: n for n, k in enumerate(keys)}
            none = pos.get(NONE, 0)
            i = next((bi for bi, b in enumerate(blocks) if b.unit == unit and b.axis == axis), None)
            if i in factors:
                raise ArtifactError(f"A joint cost-table entry names {unit!r} ({axis}) twice.")
            sel = [none] if i is None else [pos.get(o.key, none) for o in blocks[i].options]
            if unpriced is not None and i is not None:
                unpriced += [f"{blocks[i].name} {o.key}" for o in blocks[i].options[1:] if o.key not in pos]
            table = np.take(table, sel, axis=d)  # a factor no block decides: its 'none' (size 1)
            if i is not None:
                factors.append(i)
        if not factors:
            return float(table.reshape(()))
        acc.add(tuple(factors), table.reshape([len(blocks[i].options) for i in factors]))
        return 0.0

    @staticmethod
    def _block_of(unit: str, entry: Mapping[str, Any], blocks: Sequence[Block]) -> int | None:
        """The block an entry prices: its unit on its ``axis``; without an axis, the unit's block
        whose options the entry names. None when no block decides it (it always costs 'none')."""
        if "axis" in entry:
            return next((i for i, b in enumerate(blocks) if b.unit == unit and b.axis == entry["axis"]),
                        None)
        named = [i for i, b in enumerate(blocks)
                 if b.unit == unit and any(o.key in entry["costs"] for o in b.options[1:])]
        if len(named) > 1:
            raise ArtifactError(f"The cost table's entry {unit!r} names options of several axes "
                                f"({', '.join(blocks[i].axis for i in named)}); give it an \"axis\".")
        return named[0] if named else None

    def terms(self, blocks: Sequence[Block]) -> dict[str, list[Term]]:
        acc = _Acc()
        self.unpriced.clear()
        constant = self.overhead
        units = {b.unit for b in blocks}
        # whether any entry names a unit of this scan (by its own unit, a layer, or a factor's: a
        # table of pruned widths also names the layers a quantization-only scan decides)
        matched = False
        # each entry counts once: on the block that decides its unit and axis, else as a constant
        for key, e in self.entries.items():
            matched = matched or str(e.get("unit", key)) in units or \
                any(str(unit) in units for unit, _ in e.get("factors", ()))
            if "factors" in e:
                constant += self._joint(e, blocks, acc, self.unpriced)
                continue
            costs = e["costs"]
            none = float(costs.get(NONE, 0.0))
            i = self._block_of(str(e.get("unit", key)), e, blocks)
            if i is None:
                constant += none
            else:
                acc.add((i,), np.array([float(costs.get(o.key, none)) for o in blocks[i].options]))
        if blocks and self.entries and not matched:
            # every plan would cost the same: the table's model is not this scan's
            named = [str(e.get("unit", k)) for k, e in self.entries.items()]
            raise UserInputError(f"--cost-table {self.path or '(the table)'} prices none of this scan's units (it "
                                 f"names {named[0]!r}, ...; the scan {blocks[0].unit!r}, ...): it was made for another "
                                 f"model. Time this scan's model with sensplan profile --scan SCAN.")
        acc.add((), np.array(constant))
        return {self.metric: acc.result()}


#: cost models by name: a class (or factory) taking the scan, with ``name`` and ``metrics``;
#: other packages add theirs under the ``sensplan.cost_models`` entry point group
COST_MODELS: Registry[Any] = Registry("cost model", flag="--cost-model", entry_points="sensplan.cost_models")


def _as_factory(obj: Any) -> Any:
    metrics = getattr(obj, "metrics", None)
    if not callable(obj) or not isinstance(metrics, (tuple, list)) or not all(isinstance(m, str) for m in metrics):
        raise TypeError(f"{obj!r} is not a sensplan cost model: a class (or factory) taking the scan, with a "
                        f"`metrics` tuple of metric names")
    return obj


def make_cost_model(name: str, scan: Any) -> CostModel:
    """The registered cost model ``name`` built for ``scan`` (``sensplan plan --cost-model NAME``).
    A plug-in that fails to start is one message naming it, not a traceback."""
    COST_MODELS.load_entry_points(_as_factory)  # factories are kept as they are: they need the scan
    factory = COST_MODELS.get(name)
    try:
        model: CostModel = factory(scan)
    except Exception as e:  # noqa: BLE001 - a plug-in's failure, reported as such
        raise UserInputError(f"The cost model {name!r} ({COST_MODELS.origin(name)}) failed to start: "
                             f"{type(e).__name__}: {first_line(e)}. Fix the plug-in, or plan without "
                             f"--cost-model {name}.") from e
    return model


def cost_model_metrics(name: str) -> tuple[str, ...]:
    """The metrics the registered cost model ``name`` adds (without a scan)."""
    COST_MODELS.load_entry_points(_as_factory)
    return tuple(getattr(COST_MODELS.get(name), "metrics", ()))


#: the built-in scores that cannot fall below 0 (a fraction of samples right, or agreeing): a
#: drop beyond the baseline is impossible. A plug-in task's "fraction" may be any score (R^2 can go
#: below 0), so its drops are not capped
BOUNDED_AT_ZERO = ("top1", "agreement")


class Costs:
    """Blocks of one scan plus the terms of every cost model; evaluates choices.

    ``choice`` maps block index -> option index (missing blocks = option 0, no compression).
    Example::

        cm = Costs(scan, [TableCosts.load("latency.json")])
        cm.evaluate(cm.no_compression())["latency_ms"]
    """

    def __init__(self, scan: Any, extra: Sequence[CostModel] = (), signal: str = AUTO,
                 tie: Sequence[str] = ()) -> None:
        self.scan = scan
        self.analytic = AnalyticCosts(scan)
        self.blocks, self.dropped = _priceable(blocks_from_scan(scan), self.analytic)
        task = scan.data.get("task") or {}
        self.signal = signal = _check_signal(self.blocks, signal, str(task.get("planning_signal") or ""),
                                             task.get("signals"), str(task.get("name") or ""))
        #: the plan's drop from a total of the signal (the identity when planning on the drop),
        #: fitted on the measured probes; for a fast scan on the probes measured for it (the map
        #: points), whose signal is the estimate, as on the probes it maps
        fast = any(o.estimated for b in self.blocks for o in b.options[1:])
        points = [(o.signals[signal][0], o.drop) for b in self.blocks for o in b.options[1:]
                  if signal != DROP and (o.map_point if fast else not o.estimated)]
        if signal != DROP and len(points) < 2:
            raise ArtifactError(
                f"Only {len(points)} probe(s) of the scan were measured: too few to map the {signal!r} signal "
                f"to the task's drop. " + ("Scan again with a larger --fast-measured." if fast else
                                           "Plan with --signal drop, or scan more settings."))
        self.drop_map = DropMap.fit(signal, points)
        #: the largest drop the task's score allows (a fraction, higher better: its baseline, when
        #: every answer is wrong), or None; a sum of probes' drops, or the map's slope continued past
        #: its last knot, can go beyond it
        metric, base = task.get("metric") or {}, (scan.data.get("baseline") or {}).get("score")
        self.ceiling = float(base) if (metric.get("name") in BOUNDED_AT_ZERO and metric.get("higher_is_better", True)
                                       and isinstance(base, (int, float)) and base > 0) else None
        self.index = {b.name: i for i, b in enumerate(self.blocks)}
        self.conflicts = _conflicts(self.blocks, scan)
        #: the ``tie`` patterns, and the groups of blocks they tie (see :func:`tied_blocks`): each
        #: group's blocks choose the same option
        self.tie = tuple(tie)
        self.ties = tied_blocks(self.blocks, self.tie)
        self.models: list[CostModel] = [self.analytic, *extra]
        self.terms: dict[str, list[Term]] = {}
        for model in self.models:
            for metric, terms in _terms_of(model, self.blocks).items():
                if metric in self.terms:
                    raise ArtifactError(f"Two cost models provide the metric {metric!r}. Give each cost "
                                        f"model and cost table its own metric name.")
                self.terms[metric] = terms
        self.metrics = tuple(self.terms)
        self._drops = self._envelope("drop")
        self._loss_increases = self._envelope("loss_increase")
        self.original = self.evaluate(self.no_compression())

    def no_compression(self) -> dict[int, int]:
        return {i: 0 for i in range(len(self.blocks))}

    def feasible(self, choice: Mapping[int, int]) -> bool:
        """Whether ``choice`` picks no two options that cannot change one unit together, and the
        same option in every block of a tied group."""
        if any(choice.get(i, 0) == a and choice.get(j, 0) == b for (i, a), (j, b) in self.conflicts):
            return False
        return all(len({self.blocks[i].options[choice.get(i, 0)].key for i in group}) == 1 for group in self.ties)

    def evaluate(self, choice: Mapping[int, int]) -> dict[str, float]:
        """Every metric of ``choice``."""
        out = {}
        for metric, terms in self.terms.items():
            out[metric] = float(sum(t.table[tuple(choice.get(f, 0) for f in t.factors)] for t in terms))
        return out

    def objective(self, choice: Mapping[int, int]) -> float:
        """Sum of the blocks' envelope values (see :meth:`drop_table`): what the solver minimises,
        in the units of the planning signal (the drop itself with ``signal="drop"``)."""
        return float(sum(self._drops[i][choice.get(i, 0)] for i in range(len(self.blocks))))

    def predicted_drop(self, choice: Mapping[int, int], extra: float = 0.0) -> float:
        """The predicted drop of ``choice``: its objective (plus ``extra`` in the same units, e.g.
        learned penalties) through :attr:`drop_map` (the identity with ``signal="drop"``)."""
        return self.drop_of(self.objective(choice) + extra)

    def drop_of(self, total: float) -> float:
        """The predicted drop at an objective ``total`` (signal units), at most :attr:`ceiling`."""
        drop = self.drop_map(total)
        return drop if self.ceiling is None else min(drop, self.ceiling)

    def objective_of(self, drop: float) -> float:
        """The largest objective total whose predicted drop (before :attr:`ceiling`) is at most
        ``drop``."""
        return self.drop_map.inverse(drop)

    def predicted_se(self, choice: Mapping[int, int]) -> float:
        """Standard error of the additive prediction (independent probes: root sum of squares)."""
        return float(np.sqrt(sum(self.blocks[i].options[o].drop_se ** 2 for i, o in choice.items())))

    def drop_table(self, what: str = "drop") -> list[np.ndarray]:
        """Per block, the envelope drops (``what="drop"``) or loss increases, by option index."""
        return self._drops if what == "drop" else self._loss_increases

    def adjusted(self, surcharge: Mapping[int, np.ndarray] | None = None, *,
                 noise_floor: bool = False) -> Costs:
        """A copy whose drops are corrected: ``surcharge`` (block -> an addition per option, learned by
        measuring plans; see ``_verify``) is added to the scanned drops, and with ``noise_floor`` a
        drop within its standard error of zero counts as one standard error (not free). The
        envelope is then taken again; costs are shared with this object."""
        out = copy.copy(self)
        out._drops = self._envelope("drop", surcharge, noise_floor)
        return out

    def _envelope(self, what: str, surcharge: Mapping[int, np.ndarray] | None = None,
                  noise_floor: bool = False) -> list[np.ndarray]:
        """Per block, the monotone envelope of the measured drops (or loss increases).

        Within one method, stronger compression of one unit is assumed never to help: each option's
        value is the largest measured at that or any milder setting of the same method, and never
        below 0 (no compression). This removes evaluation noise (a lucky probe at 60% pruning that
        beats 50%) from the planner's input.

        Drops are otherwise used as measured. Shrinking them toward zero by their standard error
        (recorded as ``drop_se``) was tried and measured worse on ResNet-20 (held-out top-1 -1.6
        points at size=0.25): it made many small but real degradations look free.

        A learned ``surcharge`` corrects the prediction itself, so it is added to the envelope (and
        the result made monotone again): added to the raw drop before the envelope, a surcharge on
        an option whose milder neighbour measured worse would vanish in the maximum.
        """
        out = []
        signal = self.signal if what == "drop" else ""
        for bi, b in enumerate(self.blocks):
            if signal and signal != DROP:
                raw = np.array([0.0, *(o.signals[signal][0] for o in b.options[1:])])
                se = [o.signals[signal][1] for o in b.options[1:]]
            else:
                raw = np.array([o.drop if what == "drop" else o.loss_increase for o in b.options], dtype=float)
                se = [o.drop_se for o in b.options[1:]]
            if noise_floor:
                raw[1:] = np.maximum(raw[1:], se)
            vals = _monotone(b, raw)
            extra = surcharge.get(bi) if surcharge else None
            if extra is not None:
                vals = _monotone(b, vals + np.concatenate([[0.0], np.asarray(extra, dtype=float)[1:]]))
            out.append(vals)
        return out

    def choice_of(self, selected: Mapping[str, str]) -> dict[int, int]:
        """A choice from block name -> option key (unknown keys raise KeyError)."""
        out = {}
        for name, key in selected.items():
            bi = self.index[name]
            keys = [o.key for o in self.blocks[bi].options]
            out[bi] = keys.index(key)
        return out

    def describe(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self.models]


def _number(v: Any) -> float:
    """A row's number; NaN for null (an estimated row of a fast scan has no drop)."""
    return float("nan") if v is None else float(v)


def _check_signal(blocks: Sequence[Block], signal: str, preferred: str = "",
                  offered: Mapping[str, Any] | Sequence[str] | None = None, task: str = "") -> str:
    """``signal`` when every probe of the scan recorded it, else an ArtifactError naming those it did
    (``offered``: the signals the scan's task declares, when the scan says; none means its probes
    carry the drop alone, and scanning again would not change that).

    ``auto`` is ``fisher`` for a fast scan (its probes are estimated), else the task's ``preferred``
    signal when it names one (``perplexity``: ``drop``, the log-perplexity increase, itself a
    continuous loss), else ``kl`` where every probe recorded it (it ranked probes best on the bench;
    README "Planning signals"), else ``drop``."""
    probes = [o for b in blocks for o in b.options[1:]]
    have = set.intersection(*(set(o.signals) for o in probes)) if probes else set()
    estimated = sum(1 for o in probes if o.estimated)
    if signal == AUTO:
        signal = FISHER if estimated else (preferred if preferred in (DROP, *have) and preferred else
                                           "kl" if "kl" in have and len(probes) >= 2 else DROP)
    if signal == DROP:
        if estimated:
            raise ArtifactError(f"{estimated} of the scan's {len(probes)} probes were estimated (scan --fast), not "
                                f"measured, so the plan cannot add up measured drops. Use --signal fisher (or "
                                f"auto), or scan without --fast.")
        return signal
    if signal not in have:
        named = f" ({task})" if task else ""
        if offered is not None and not offered and not have:
            raise ArtifactError(f"The scan's task{named} records no planning signal "
                                f"besides the drop, so {signal!r} cannot be planned on. Plan on the drop: "
                                f"--signal drop (or auto, the default).")
        if offered is not None and signal not in offered:
            raise ArtifactError(f"{signal!r} is not a planning signal of the scan's task{named}: it records "
                                f"{', '.join([DROP, *sorted(offered)])}. Use one of them (--signal).")
        offered = ", ".join([DROP, *sorted(have)])
        raise ArtifactError(f"The planning signal {signal!r} is not in every probe of the scan (a scan made before "
                            f"sensplan recorded signals, or one whose task does not offer it). Use one of: "
                            f"{offered} (--signal), or scan again.")
    return signal


def _terms_of(model: CostModel, blocks: Sequence[Block]) -> dict[str, list[Term]]:
    """A cost model's terms, checked: every table has one axis per factor, as long as that block's
    options, and finite entries. A plug-in's mistake is one message naming it."""
    name = getattr(model, "name", "") or model.describe().get("name", type(model).__name__)
    try:
        got = model.terms(blocks)
        for metric, terms in got.items():
            for t in terms:
                table = np.asarray(t.table, dtype=float)
                want = tuple(len(blocks[f].options) for f in t.factors)
                if table.shape != want or not np.all(np.isfinite(table)):
                    raise ValueError(f"a {metric!r} term over blocks {t.factors} has a table of shape "
                                     f"{table.shape}, not {want} (one entry per option), or entries that are not "
                                     f"finite")
        return got
    except (UserInputError, ArtifactError):
        raise
    except Exception as e:  # noqa: BLE001 - a plug-in's mistake, reported as such
        raise UserInputError(f"The cost model {name!r} gave terms sensplan cannot use ({type(e).__name__}: "
                             f"{first_line(e)}). Fix the plug-in, or plan without it.") from e


def _monotone(block: Block, values: np.ndarray) -> np.ndarray:
    """Per option, the largest of ``values`` at that or any milder option of the same method and
    family (the options are in strength order within a method), and never below 0."""
    out = np.zeros(len(block.options))
    best: dict[tuple[str | None, str], float] = {}
    for i, o in enumerate(block.options):
        key = (o.method, o.family)
        best[key] = max(max(0.0, float(values[i])), best.get(key, 0.0))
        out[i] = best[key]
    return out


def _priceable(blocks: list[Block], analytic: AnalyticCosts) -> tuple[list[Block], dict[str, dict[str, str]]]:
    """The blocks without the options the analytic costs cannot price exactly, and those options'
    reasons (method -> unit -> reason, as a scan's skipped units)."""
    bad = analytic.unpriceable(blocks)
    if not bad:
        return blocks, {}
    dropped: dict[str, dict[str, str]] = {}
    out = []
    for i, b in enumerate(blocks):
        keep = [o for k, o in enumerate(b.options) if (i, k) not in bad]
        for k, o in enumerate(b.options):
            if (i, k) in bad and o.method is not None:
                dropped.setdefault(o.method, {})[b.unit] = bad[(i, k)]
        out.append(dataclasses.replace(b, options=tuple(keep)))
    return out, dropped


#: the named tie patterns (``--tie experts``): an MoE layer's experts, whose index is the only
#: difference between their units' names (``...mlp.experts.3.gate_up_proj``)
TIE_PATTERNS = {"experts": r"\.experts\.\d+(?=\.|$)"}


def tie_regex(text: str) -> re.Pattern[str]:
    """The regular expression of a tie pattern (a name in :data:`TIE_PATTERNS`, or one itself)."""
    try:
        return re.compile(TIE_PATTERNS.get(text, text))
    except re.error as e:
        raise UserInputError(f"--tie {text}: not a regular expression ({e}). Use --tie experts, or a pattern "
                             f"such as '\\.experts\\.\\d+'.") from None


def tied_blocks(blocks: Sequence[Block], patterns: Sequence[str]) -> list[list[int]]:
    """The groups of ``blocks`` (indices, two or more each) that must choose the same option: the
    blocks of one axis whose units read the same once every match of a pattern is replaced by
    ``*``. A pattern is a regular expression or a name in :data:`TIE_PATTERNS`. For an MoE model,
    ``experts`` gives each layer's experts one bit width per projection and one pruned width, the
    form fused expert kernels (and ``save_pretrained``) take. UserInputError for a pattern that is
    not a regular expression, or that ties no two blocks."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for text in patterns:
        rx = tie_regex(text)
        found = 0
        for i, b in enumerate(blocks):
            key = rx.sub("*", b.unit)
            if key != b.unit:
                groups.setdefault((text, b.axis, key), []).append(i)
                found += 1
        if not any(len(g) > 1 for k, g in groups.items() if k[0] == text):
            example = ", ".join(b.unit for b in blocks[:3])
            raise UserInputError(f"--tie {text} ties no two units of the scan ({found} matched; its units are "
                                 f"e.g. {example}). Drop --tie, or give a pattern that matches the part of the "
                                 f"names that differs between the units to tie (e.g. an expert's index).")
    # a block in two groups (two patterns) joins them
    out: list[set[int]] = []
    for g in groups.values():
        merged = set(g)
        for other in [o for o in out if o & merged]:
            merged |= other
            out.remove(other)
        out.append(merged)
    tied = [sorted(g) for g in out if len(g) > 1]
    for group in tied:  # tied blocks choose one option by key: they must share more than "none"
        shared = set.intersection(*({o.key for o in blocks[i].options} for i in group))
        if shared == {NONE} and any(len(blocks[i].options) > 1 for i in group):
            a = next(blocks[i] for i in group if len(blocks[i].options) > 1)
            b = next(blocks[i] for i in group if blocks[i] is not a)
            b_has = b.options[-1].label if len(b.options) > 1 else "no scanned option (its probes were skipped)"
            raise UserInputError(f"--tie ties {a.unit} and {b.unit} ({a.axis}), which share no scanned option ("
                                 f"{a.options[-1].label} against {b_has}: different widths or settings), so none of "
                                 f"them could be compressed. Tie units of one shape (an MoE layer's experts), or "
                                 f"drop --tie.")
    return tied


def _conflicts(blocks: Sequence[Block], scan: Any) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pairs of (block, option) on one unit that cannot be chosen together: their methods declared
    each other incompatible (``incompatible_with`` in the scan), or both restructure the layer; and
    an option that ``requires`` (a runtime's rule in the scan: ``[unit, axis, option key, other
    axis, allowed]``) one of the ``allowed`` option keys on another axis of its unit (any but
    'none' when ``allowed`` is left out) conflicts with that axis's other options."""
    incompatible = {name: set(info.get("incompatible_with") or ()) for name, info in scan.methods.items()}
    by_unit: dict[tuple[str, str], list[int]] = {}  # a group and a layer of one name are two units
    for i, b in enumerate(blocks):
        by_unit.setdefault((b.kind, b.unit), []).append(i)
    out = []
    for members in by_unit.values():
        for i, j in itertools.combinations(members, 2):
            for ka, oa in enumerate(blocks[i].options[1:], 1):
                for kb, ob in enumerate(blocks[j].options[1:], 1):
                    both = oa.effect.get("structure") is not None and ob.effect.get("structure") is not None
                    if both or ob.method in incompatible.get(str(oa.method), ()) or \
                            oa.method in incompatible.get(str(ob.method), ()):
                        out.append(((i, ka), (j, kb)))
    index = {(b.kind, b.unit, b.axis): i for i, b in enumerate(blocks)}
    for unit, axis, key, other, *allowed in scan.data.get("requires") or ():
        needs, needed = index.get(("layer", unit, axis)), index.get(("layer", unit, other))
        if needs is None or needed is None:
            continue
        ok = set(allowed[0]) if allowed else {o.key for o in blocks[needed].options[1:]}
        refused = [kb for kb, ob in enumerate(blocks[needed].options) if not kb or ob.key not in ok]
        out += [((needs, k), (needed, kb)) for k, o in enumerate(blocks[needs].options) if k and o.key == key
                for kb in refused]
    return out


def merged_effects(blocks: Sequence[Block], choice: Mapping[int, int]) -> dict[str, dict[str, Any]]:
    """Per layer, the merged effect of its chosen options (layers with none chosen are omitted)."""
    return merge_per_unit((b.unit, b.options[choice[i]].effect) for i, b in enumerate(blocks)
                          if b.kind == "layer" and choice.get(i, 0))


__all__ = ["ANALYTIC_METRICS", "COST_MODELS", "COST_TABLE_FORMAT", "LAYER_DEFAULTS", "METRICS", "AnalyticCosts",
           "Block", "CostModel", "Costs", "Option", "TableCosts", "Term", "blocks_from_scan", "cost_model_metrics",
           "make_cost_model", "merged_effects", "option_key"]
