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
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sensplan._effects import FLOAT_BITS, LAYER_DEFAULTS, merge, weight_coefficients
from sensplan._errors import ArtifactError

ANALYTIC_METRICS = ("size", "macs", "bops", "params")
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
                        dict(r.get("effect", {})), float(r.get("level", 0.0)), float(r["drop"]),
                        float(r.get("drop_se", 0.0) or 0.0), float(r.get("loss_increase") or 0.0))
                 for r in rows]
        channels = int(scan.groups[unit]["channels"]) if kind == "group" and unit in scan.groups else 0
        step = int(scan.groups[unit].get("channel_step", 1)) if kind == "group" and unit in scan.groups else 1
        blocks.append(Block(unit, axis, kind, tuple(opts), channels, step))
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


def _outer(vecs: Sequence[tuple[int, np.ndarray]]) -> tuple[tuple[int, ...], np.ndarray]:
    """Product table of per-block vectors (a block may repeat: its vectors multiply elementwise)."""
    merged: dict[int, np.ndarray] = {}
    for f, v in vecs:
        merged[f] = merged[f] * v if f in merged else np.asarray(v, dtype=float)
    factors = tuple(sorted(merged))
    table = np.ones([len(merged[f]) for f in factors]) if factors else np.ones(())
    for pos, f in enumerate(factors):
        shape = [1] * len(factors)
        shape[pos] = len(merged[f])
        table = table * merged[f].reshape(shape)
    return factors, table


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


class AnalyticCosts:
    """Size (bytes), MACs, BOPs and parameters from the scan's tensor shapes (exact).

    Example::

        cm = Costs(scan)                  # AnalyticCosts is always included
        cm.evaluate(cm.no_compression())["macs"] == cm.original["macs"]
    """

    metrics: tuple[str, ...] = ANALYTIC_METRICS

    def __init__(self, scan: Any) -> None:
        self.scan = scan

    def describe(self) -> dict[str, Any]:
        return {"name": "analytic", "metrics": list(self.metrics),
                "units": {"size": "bytes", "macs": "per sample", "bops": "per sample",
                          "params": "count"}}

    def terms(self, blocks: Sequence[Block]) -> dict[str, list[Term]]:
        group_block = {b.unit: i for i, b in enumerate(blocks) if b.kind == "group"}
        local: dict[str, list[int]] = {}
        for i, b in enumerate(blocks):
            if b.kind == "layer":
                local.setdefault(b.unit, []).append(i)
        acc = {m: _Acc() for m in self.metrics}
        for t in self.scan.tensors.values():
            shape = [float(s) for s in t["shape"]]
            # per dim: the constant size and, per group block, the size change by option
            pieces: list[list[tuple[int | None, np.ndarray]]] = []
            for d, s in enumerate(shape):
                row: list[tuple[int | None, np.ndarray]] = [(None, np.array(s))]
                for gid, dims in t["shrinks"].items():
                    per = dims.get(str(d)) if isinstance(dims, Mapping) else None
                    if per and gid in group_block:
                        bi = group_block[gid]
                        removed = np.array([o.effect.get("removed", 0) for o in blocks[bi].options], float)
                        row.append((bi, -removed * float(per)))
                pieces.append(row)
            numel = _expand(pieces)
            rows = _expand(pieces[:1]) if pieces else [((), np.ones(()))]
            layer = t.get("layer")
            is_param = t.get("kind", "parameter") == "parameter"
            if is_param:
                for f, tab in numel:
                    acc["params"].add(f, tab)
            if layer is None or layer not in self.scan.layers:
                for f, tab in numel:
                    acc["size"].add(f, tab * float(t["storage_bits"]) / 8)
                continue
            lb = local.get(layer, [])
            grids = self._local_grids(blocks, lb, int(np.prod(t["shape"][1:])) if len(shape) > 1 else 1)
            numel0 = float(np.prod(shape)) if shape else 1.0
            macs_per = float(self.scan.layers[layer]["macs"]) / max(1.0, numel0)
            for f, tab in numel:
                acc["macs"].add(f, tab * macs_per)
                self._add_local(acc["size"], f, tab, lb, grids["a"] / 8)
                self._add_local(acc["bops"], f, tab * macs_per, lb, grids["wb"] * grids["ab"])
            for f, tab in rows:
                self._add_local(acc["size"], f, tab, lb, grids["b"] / 8)
            self._add_local(acc["size"], (), np.ones(()), lb, grids["c"] / 8)
        return {m: a.result() for m, a in acc.items()}

    def direct(self, removed: Mapping[str, float], effects: Mapping[str, Mapping[str, Any]]
               ) -> dict[str, float]:
        """Every metric computed tensor by tensor (no terms) when group ``g`` loses ``removed[g]``
        channels (any count) and layer ``l`` has the merged effect ``effects[l]``. Used for the
        uniform baseline's fine ratio grid, and by the tests to check the term expansion."""
        out = dict.fromkeys(self.metrics, 0.0)
        for t in self.scan.tensors.values():
            shape = [float(s) for s in t["shape"]]
            for gid, dims in t["shrinks"].items():
                for d, per in (dims.items() if isinstance(dims, Mapping) else []):
                    shape[int(d)] -= float(removed.get(gid, 0)) * float(per)
            numel = float(np.prod(shape)) if shape else 1.0
            if t.get("kind", "parameter") == "parameter":
                out["params"] += numel
            layer = t.get("layer")
            if layer is None or layer not in self.scan.layers:
                out["size"] += numel * float(t["storage_bits"]) / 8
                continue
            eff = merge([effects.get(layer, {})])
            a, b, c = weight_coefficients(eff, int(np.prod(t["shape"][1:])) if len(shape) > 1 else 1)
            rows = shape[0] if shape else 1.0
            out["size"] += (a * numel + b * rows + c) / 8
            numel0 = float(np.prod(t["shape"])) if shape else 1.0
            macs = float(self.scan.layers[layer]["macs"]) * numel / max(1.0, numel0)
            out["macs"] += macs
            out["bops"] += macs * float(eff["weight_bits"]) * float(eff["act_bits"])
        return out

    @staticmethod
    def _add_local(acc: _Acc, factors: tuple[int, ...], table: np.ndarray, lb: Sequence[int],
                   grid: np.ndarray) -> None:
        """Add ``table`` (over ``factors``) times ``grid`` (over the layer's own blocks ``lb``)."""
        t = np.asarray(table, dtype=float)
        full = t.reshape(t.shape + (1,) * len(lb)) * grid.reshape((1,) * t.ndim + grid.shape)
        acc.add((*factors, *lb), full)

    @staticmethod
    def _local_grids(blocks: Sequence[Block], lb: Sequence[int], row_len: int) -> dict[str, np.ndarray]:
        """Per combination of the layer's own options: size coefficients a, b, c (bits) and the
        weight and activation bits that BOPs use."""
        dims = [len(blocks[i].options) for i in lb]
        out = {k: np.zeros(dims) for k in ("a", "b", "c", "wb", "ab")}
        for combo in itertools.product(*[range(d) for d in dims]):
            eff = merge(blocks[i].options[o].effect for i, o in zip(lb, combo, strict=True))
            a, b, c = weight_coefficients(eff, row_len)
            out["a"][combo], out["b"][combo], out["c"][combo] = a, b, c
            out["wb"][combo] = float(eff.get("weight_bits", FLOAT_BITS))
            out["ab"][combo] = float(eff.get("act_bits", FLOAT_BITS))
        return out


def _expand(pieces: Sequence[Sequence[tuple[int | None, np.ndarray]]]) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Expand a product over dims of (constant + per-group changes) into monomial tables."""
    out = []
    for combo in itertools.product(*pieces):
        const = 1.0
        vecs = []
        for f, v in combo:
            if f is None:
                const *= float(v)
            else:
                vecs.append((f, v))
        factors, table = _outer(vecs)
        out.append((factors, table * const))
    return out


@dataclass
class TableCosts:
    """A measured cost table: ``metric``, a fixed ``overhead`` and per unit, per option key, the
    unit's cost (the key ``none`` = uncompressed). The total is the overhead plus every unit's cost
    at its chosen option; a unit or option missing from the table costs as ``none`` (or 0).

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
    metrics: tuple[str, ...] = field(init=False)

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
                for v in e["costs"].values():
                    float(v)
            return cls(str(obj["metric"]), float(obj.get("overhead", 0.0)), entries,
                       str(obj.get("unit", "")), str(Path(path)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{str(path)!r} is not a valid cost table ({type(e).__name__}: {e}). "
                                f"See docs/formats.md for its fields.") from None

    def describe(self) -> dict[str, Any]:
        return {"name": "table", "metrics": [self.metric], "unit": self.unit, "path": self.path,
                "overhead": self.overhead}

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
        constant = self.overhead
        # each entry counts once: on the block that decides its unit and axis, else as a constant
        for unit, e in self.entries.items():
            costs = e["costs"]
            none = float(costs.get(NONE, 0.0))
            i = self._block_of(unit, e, blocks)
            if i is None:
                constant += none
            else:
                acc.add((i,), np.array([float(costs.get(o.key, none)) for o in blocks[i].options]))
        acc.add((), np.array(constant))
        return {self.metric: acc.result()}


class Costs:
    """Blocks of one scan plus the terms of every cost model; evaluates choices.

    ``choice`` maps block index -> option index (missing blocks = option 0, no compression).
    Example::

        cm = Costs(scan, [TableCosts.load("latency.json")])
        cm.evaluate(cm.no_compression())["latency_ms"]
    """

    def __init__(self, scan: Any, extra: Sequence[CostModel] = ()) -> None:
        self.scan = scan
        self.blocks = blocks_from_scan(scan)
        self.index = {b.name: i for i, b in enumerate(self.blocks)}
        self.analytic = AnalyticCosts(scan)
        self.models: list[CostModel] = [self.analytic, *extra]
        self.terms: dict[str, list[Term]] = {}
        for model in self.models:
            for metric, terms in model.terms(self.blocks).items():
                if metric in self.terms:
                    raise ArtifactError(f"Two cost models provide the metric {metric!r}. Give each cost "
                                        f"table its own metric name.")
                self.terms[metric] = terms
        self.metrics = tuple(self.terms)
        self._drops = self._envelope("drop")
        self._loss_increases = self._envelope("loss_increase")
        self.original = self.evaluate(self.no_compression())

    def no_compression(self) -> dict[int, int]:
        return {i: 0 for i in range(len(self.blocks))}

    def evaluate(self, choice: Mapping[int, int]) -> dict[str, float]:
        """Every metric of ``choice``."""
        out = {}
        for metric, terms in self.terms.items():
            out[metric] = float(sum(t.table[tuple(choice.get(f, 0) for f in t.factors)] for t in terms))
        return out

    def predicted_drop(self, choice: Mapping[int, int]) -> float:
        """Sum of the blocks' envelope drops (see :meth:`drop_table`): the additive prediction."""
        return float(sum(self._drops[i][choice.get(i, 0)] for i in range(len(self.blocks))))

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
        """
        out = []
        for bi, b in enumerate(self.blocks):
            vals = np.zeros(len(b.options))
            best: dict[str | None, float] = {}
            extra = surcharge.get(bi) if surcharge else None
            for i, o in enumerate(b.options):
                raw = o.drop if what == "drop" else o.loss_increase
                if i and noise_floor:
                    raw = max(raw, o.drop_se)
                if i and extra is not None:
                    raw += float(extra[i])
                v = max(0.0, raw)
                best[o.method] = max(v, best.get(o.method, 0.0))
                vals[i] = best[o.method]
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


def merged_effects(blocks: Sequence[Block], choice: Mapping[int, int]) -> dict[str, dict[str, Any]]:
    """Per layer, the merged effect of its chosen options (layers with none chosen are omitted)."""
    per: dict[str, list[Mapping[str, Any]]] = {}
    for i, b in enumerate(blocks):
        if b.kind == "layer" and choice.get(i, 0):
            per.setdefault(b.unit, []).append(b.options[choice[i]].effect)
    return {u: merge(effs) for u, effs in per.items()}


__all__ = ["ANALYTIC_METRICS", "COST_TABLE_FORMAT", "LAYER_DEFAULTS", "METRICS", "AnalyticCosts", "Block",
           "CostModel", "Costs", "Option", "TableCosts", "Term", "blocks_from_scan", "merged_effects",
           "option_key"]
