"""Cost models computed from a scan table alone (no model): size, MACs, bit-operations, parameters.

A *choice* is one option per decision block:

- a pruning block per scanned group: how many of its channels are removed (0 = none);
- a quantization block per Conv/Linear layer: weight bits (32 = kept in float32).

Every state-dict tensor shrinks along the dims the scan's safety check saw shrink with each group,
by ``keep = (channels - removed) / channels`` of that group. So each cost is a sum of *terms*, each
term depending on a few blocks only (a conv weight: its output group, its input group, its bits).

Units: ``size`` in bytes (quantized weights: packed codes plus one float32 scale per output channel;
everything else at its storage width), ``macs`` per sample (Conv/Linear only), ``bops`` =
MACs x weight bits x activation bits (activations stay float: 32 bits), ``params`` = parameter count.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sensplan.sensitivity import Scan
from sensplan.sensitivity._quant import FLOAT_BITS

METRICS = ("size", "macs", "bops", "params")
ACTIVATION_BITS = 32  # weight-only quantization: activations stay float32
SCALE_BITS = 32  # one float32 scale per output channel of a quantized weight


@dataclass(frozen=True)
class Block:
    """A decision: ``name`` is ``"prune:<group>"`` or ``"quantize:<layer>"``; ``options`` are removed
    channel counts (prune) or bits (quantize), first option = no compression; ``ratios`` the
    nominal ratio of each pruning option; ``drops``/``loss_increases`` the measured values."""

    name: str
    unit: str
    kind: str
    options: tuple[int, ...]
    ratios: tuple[float, ...]
    drops: tuple[float, ...]
    loss_increases: tuple[float, ...]
    channels: int = 0


@dataclass(frozen=True)
class Term:
    """Cost that depends on ``factors`` (block indices): ``table[i, j, ...]`` for their options."""

    factors: tuple[int, ...]
    table: np.ndarray


class CostModel:
    """Blocks and cost terms of one scan. ``evaluate(choice)`` gives every metric of a choice.

    ``choice`` maps block index -> option index. Example::

        cm = CostModel(scan)
        cm.evaluate(cm.no_compression())["macs"] == cm.original["macs"]
    """

    def __init__(self, scan: Scan) -> None:
        self.scan = scan
        blocks: list[Block] = []
        for gid in scan.scanned_groups():
            rows = sorted(scan.results_for(gid, "prune"), key=lambda r: r["n_remove"])
            if not rows:
                continue
            blocks.append(Block(f"prune:{gid}", gid, "prune", (0, *(int(r["n_remove"]) for r in rows)),
                                (0.0, *(float(r["ratio"]) for r in rows)),
                                (0.0, *(float(r["drop"]) for r in rows)),
                                (0.0, *(float(r["loss_increase"]) for r in rows)),
                                int(scan.groups[gid]["channels"])))
        for layer in scan.layers:
            rows = sorted(scan.results_for(layer, "quantize"), key=lambda r: -r["bits"])
            blocks.append(Block(f"quantize:{layer}", layer, "quantize",
                                (FLOAT_BITS, *(int(r["bits"]) for r in rows)),
                                (0.0,) * (len(rows) + 1),
                                (0.0, *(float(r["drop"]) for r in rows)),
                                (0.0, *(float(r["loss_increase"]) for r in rows))))
        self.blocks = blocks
        self.index = {b.name: i for i, b in enumerate(blocks)}
        self._drops = self._envelope("drop")
        self._loss_increases = self._envelope("loss_increase")
        self.terms: dict[str, list[Term]] = {m: self._terms(m) for m in METRICS}
        self.original = self.evaluate(self.no_compression())

    # -- building terms -------------------------------------------------------------------------
    def _keep(self, bi: int) -> list[float]:
        """Fraction of its channels block ``bi``'s group keeps, per option."""
        b = self.blocks[bi]
        return [(b.channels - k) / b.channels for k in b.options] if b.kind == "prune" else [1.0] * len(b.options)

    def tensor_cost(self, metric: str, key: str, keep: Mapping[str, float], bits: int) -> float:
        """Cost of one state-dict tensor when group ``g`` keeps ``keep[g]`` of its channels and the
        tensor's layer (if it is a Conv/Linear weight) has ``bits``-bit weights."""
        t = self.scan.tensors[key]
        layer = t.get("layer")
        if metric == "params" and t.get("kind", "parameter") != "parameter":
            return 0.0
        if metric in ("macs", "bops") and layer is None:
            return 0.0
        shape = np.array(t["shape"], dtype=float)
        s = shape.copy()
        for gid, dims in t["shrinks"].items():
            for d in dims:
                s[d] *= keep.get(gid, 1.0)
        numel = float(np.prod(s)) if len(s) else 1.0
        if metric == "params":
            return numel
        if metric == "size":
            if layer is not None and bits != FLOAT_BITS:
                return numel * bits / 8 + s[0] * SCALE_BITS / 8
            return numel * t["storage_bits"] / 8
        macs = self.scan.layers[layer]["macs"] * numel / max(1.0, float(np.prod(shape)))
        return macs * bits * ACTIVATION_BITS if metric == "bops" else macs

    def _terms(self, metric: str) -> list[Term]:
        acc: dict[tuple[int, ...], np.ndarray] = {}
        keeps = [self._keep(i) for i in range(len(self.blocks))]
        for key, t in self.scan.tensors.items():
            gfactors = sorted(self.index[f"prune:{g}"] for g in t["shrinks"] if f"prune:{g}" in self.index)
            layer = t.get("layer")
            qi = self.index.get(f"quantize:{layer}") if layer else None
            if metric in ("size", "bops") and qi is not None:
                factors = (*gfactors, qi)
            else:
                factors, qi = tuple(gfactors), None
            grids = [range(len(self.blocks[f].options)) for f in factors]
            table = np.zeros([len(g) for g in grids])
            for combo in itertools.product(*grids):
                keep = {self.blocks[f].unit: keeps[f][o]
                        for f, o in zip(factors, combo, strict=True) if f != qi}
                bits = self.blocks[qi].options[combo[-1]] if qi is not None else FLOAT_BITS
                table[combo] = self.tensor_cost(metric, key, keep, bits)
            acc[factors] = acc[factors] + table if factors in acc else table
        return [Term(f, tab) for f, tab in acc.items()]

    def evaluate_settings(self, removed: Mapping[str, int], bits: Mapping[str, int]) -> dict[str, float]:
        """Every metric when group ``g`` loses ``removed[g]`` channels and layer ``l`` has ``bits[l]``
        (any counts, not only scanned ones; missing entries = no compression)."""
        keep = {g: (v["channels"] - removed.get(g, 0)) / v["channels"] for g, v in self.scan.groups.items()}
        out = {}
        for metric in METRICS:
            out[metric] = float(sum(self.tensor_cost(metric, k, keep, bits.get(t.get("layer") or "", FLOAT_BITS))
                                    for k, t in self.scan.tensors.items()))
        return out

    # -- evaluating choices -----------------------------------------------------------------------
    def no_compression(self) -> dict[int, int]:
        return {i: 0 for i in range(len(self.blocks))}

    def evaluate(self, choice: Mapping[int, int]) -> dict[str, float]:
        """Every metric of ``choice`` (block index -> option index; missing blocks = option 0)."""
        out = {}
        for metric, terms in self.terms.items():
            out[metric] = float(sum(t.table[tuple(choice.get(f, 0) for f in t.factors)] for t in terms))
        return out

    def predicted_drop(self, choice: Mapping[int, int]) -> float:
        """Sum of the units' envelope drops (see :meth:`drop_table`): additive prediction."""
        return float(sum(self._drops[i][choice.get(i, 0)] for i in range(len(self.blocks))))

    def drop_table(self, what: str = "drop") -> list[np.ndarray]:
        """Per block, the envelope drops (``what="drop"``) or loss increases, by option index."""
        return self._drops if what == "drop" else self._loss_increases

    def _envelope(self, what: str) -> list[np.ndarray]:
        """Per block, the monotone envelope of the measured drops (or loss increases).

        More compression of one unit is assumed never to help: each option's value is the largest
        measured at that or any milder setting, and never below 0 (no compression). This removes
        evaluation noise (a lucky probe at 60% pruning that beats 50%) from the planner's input.

        Drops are otherwise used as measured. Shrinking them toward zero by their standard error
        (recorded in the scan as ``drop_se``) was tried and measured worse on ResNet-20 (held-out
        top-1 -1.6 points at size=0.25): it made many small but real degradations look free, and the
        planner stacked them.
        """
        out = []
        for b in self.blocks:
            vals = np.array(b.drops if what == "drop" else b.loss_increases, dtype=float)
            out.append(np.maximum.accumulate(np.maximum(vals, 0.0)))
        return out
