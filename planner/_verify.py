"""Verify a plan before it is written: measure it, correct the drop model, never lose to uniform.

The additive drop model (a plan's drop = the sum of its units' scanned drops) cannot see that
errors compound (ten layers at 2 bits, each nearly free alone) or cancel, and the solver prefers the
units whose sample drops happened to be low (the winner's curse). So, with a :class:`Verifier`
(the model and its data), :func:`verify`:

1. measures the solved allocation exactly as the executor applies it without fine-tuning (the
   methods' transformations, BatchNorm recalibration) on the scan's sample and on a held-out split
   the scan never saw;
2. when the sample measurement falls outside the prediction's 95% interval, measures the joint drop
   of the chosen units per option (e.g. all layers chosen at 2 bits together), learns a surcharge
   per option from how far each joint drop is from the sum of its units' drops (and spreads what
   is still unexplained over the options by their joint drops), and solves again with the
   corrected drops; up to ``rounds`` solves;
3. measures the uniform candidates at the same budget (every combination of layer options, each
   with the least pruning that fits) the same way;
4. keeps the best *measured* candidate on the held-out split (on the sample when there is none):
   a plan round or a uniform candidate (an exact tie goes to uniform), and records which won, by
   how much, and whether that margin was within one paired standard error (:func:`_within_noise`:
   a close call, reported as such). A margin within noise does not hand the choice to uniform: the
   uniform side is the best of up to :data:`MAX_UNIFORM` candidates on the same split, so it is the
   likelier of the two to have been lucky there, and a head start would stack a second bias on
   that one (``bench/bench_pick.py`` measures both rules on outcomes whose truth is known).

Scanned drops within their standard error of zero are not taken as free: the corrected rounds use
``max(drop, se)`` (:meth:`Costs.adjusted`). The first round uses the scan as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sensplan._errors import ArtifactError, InfeasibleBudgetError, UserInputError
from sensplan._metric import TOP1, Metric
from sensplan.planner._budget import Budget
from sensplan.planner._costs import Costs
from sensplan.planner._plan import Z95
from sensplan.planner._solver import CountPenalty, cost_metric, penalty, solve, uniform_candidates

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sensplan.sensitivity import EvalSet, ModelSpec

#: a measurement within this of the prediction is never corrected (a tenth of a point)
TOLERANCE = 0.001
#: option groups whose joint drop is measured per correction round (the largest first)
MAX_BUCKETS = 6
#: uniform candidates measured (the best predicted first)
MAX_UNIFORM = 8
#: a race measures this fraction of the split first (at least 500 samples, the whole split when smaller)
RACE_HEAD = 0.25
#: ... and stops a candidate worse than its rival there by more than this many paired standard errors
RACE_Z = 3.0


@dataclass(frozen=True)
class Measured:
    """One allocation measured on one split: the drop from the original (and its paired standard
    error), the score, and the number of samples."""

    drop: float
    se: float
    score: float
    n: int
    #: per-sample scores (to compare two candidates on the same samples), not serialized
    per_sample: Any = dataclasses.field(default=None, compare=False, repr=False)
    #: set when a race stopped the measurement at the split's head: how much worse than which
    #: rival it was there (see :meth:`Verifier.measure`)
    stopped: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"drop": self.drop, "drop_se": self.se, "score": self.score, "n": self.n,
                **({"stopped_early": self.stopped} if self.stopped else {})}


class Verifier:
    """The model and data a plan is verified on.

    ``data`` is the scan's evaluation sample, ``calib`` its BatchNorm calibration data, ``held`` a
    split of the same distribution that neither the scan nor the calibration saw (None: verify on
    the sample only). ``dtype`` evaluates under autocast, as a scan with that ``dtype`` did (None:
    float32). ``model`` is never modified (a model in training mode is copied). Example::

        v = Verifier(model, data, calib, held, model_spec=spec)
        plan = make_plan(scan, [Budget.parse("size=0.125")], verifier=v)
    """

    def __init__(self, model: nn.Module, data: EvalSet, calib: EvalSet | None, held: EvalSet | None = None,
                 *, report: EvalSet | None = None, model_spec: ModelSpec | None = None,
                 device: str | torch.device | None = None, batch_size: int = 500,
                 dtype: torch.dtype | None = None, channels_last: bool | None = None,
                 memo: str | os.PathLike[str] | None = None) -> None:
        import torch

        from sensplan.sensitivity import channels_last_wins

        if device is not None and torch.device(device) != next(model.parameters()).device:
            model = copy.deepcopy(model).to(device)
        elif any(m.training for m in model.modules()):  # eval mode needed; the caller's model keeps its own
            model = copy.deepcopy(model)
        dev = next(model.parameters()).device
        self.model = model.eval()
        self.device = dev
        self.dtype = None if dtype == torch.float32 else dtype
        self.data = data.to(dev)
        self.calib = calib.to(dev) if calib is not None else None
        # in an order whose every head is stratified by class: a race measures a head first
        self.held = _interleaved(held.to(dev)) if held is not None and len(held) else None
        self.report = report.to(dev) if report is not None and len(report) else None
        # inputs in the memory order the model runs fastest on (timed once, see channels_last_wins;
        # or the order given: the scan's, so that a pool's workers all measure in one order)
        self.channels_last = channels_last if channels_last is not None else \
            channels_last_wins(self.model, self.data.x, batch_size, self.dtype)
        for split in ("data", "calib", "held", "report"):
            if getattr(self, split) is not None:
                setattr(self, split, getattr(self, split).in_layout(self.channels_last))
        #: how the held-out data was drawn, for plan.json (``apply`` draws the report half again)
        self.held_draw: dict[str, Any] | None = None
        self.model_spec = model_spec
        self.batch_size = batch_size
        self._task_name = ""
        self._base: dict[str, Any] = {}
        #: measurements by (task, split, allocation): a candidate measured for one budget is not
        #: measured again for another, or when planning again
        self._memo: dict[tuple[str, str, str], Measured] = {}
        self._reference: Any = None  # the original's BatchNorm statistics on ``calib``
        #: ``memo``: a file that keeps the measurements for later runs (see :func:`memo_path`)
        self._disk: Any = None
        self._from_disk: set[tuple[str, str, str]] = set()
        if memo is not None:
            self._open_memo(memo, held)
        self.counts: Counter[str] = Counter()
        #: worker processes that measure candidates side by side (see :func:`verifier_from_scan`)
        self.pool: _Pool | None = None

    def measure_many(self, plan_data: Mapping[str, Any], allocs: Sequence[Mapping[str, Any]], *,
                     held: bool = True, sample: bool = True, rival: Measured | None = None
                     ) -> list[tuple[Measured | None, Measured | None]]:
        """:meth:`measure` for each of ``allocs``: side by side on the worker processes where the
        verifier has them (each rebuilt from the scan, measuring as this one would), else in turn.
        An allocation this verifier measured before (any split, a race's head included) is answered
        here, from what it has, as :meth:`measure` would."""
        if self.pool is None or len(allocs) < 2:
            return [self.measure(plan_data, a, held=held, sample=sample, rival=rival) for a in allocs]
        self._prepare(plan_data["task"]["name"])
        seen = {(k[0], k[2]) for k in self._memo}
        remote = [_alloc_key(plan_data, a) not in seen for a in allocs]
        sent = _on_device(rival, "cpu")
        futures = {i: self.pool.submit(plan_data, a, held, sample, sent)
                   for i, a in enumerate(allocs) if remote[i]}
        out = []
        for i, a in enumerate(allocs):
            if i not in futures:
                out.append(self.measure(plan_data, a, held=held, sample=sample, rival=rival))
                continue
            result, memo, counts = self.pool.result(futures[i])
            for key, m in memo.items():
                if key not in self._memo:
                    self._remember(key, _on_device(m, self.device) or m)
            self.counts.update(counts)
            self.counts["measurements on workers"] += counts.get("measurements", 0)
            out.append((_on_device(result[0], self.device), _on_device(result[1], self.device)))
        return out

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`measure_many` measures in turn), and close
        the memo file."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self._disk is not None:
            self._disk.close()
            self._disk = None

    def _prepare(self, task_name: str) -> None:
        if task_name == self._task_name:
            return
        from sensplan.sensitivity import get_task

        self._base = {"task": get_task(task_name)}
        for split, ds in (("sample", self.data), ("held", self.held), ("report", self.report)):
            if ds is not None:
                self._base[split] = self._original_on(ds)
        self._task_name = task_name

    def _original_on(self, ds: EvalSet) -> tuple[EvalSet, Any, Any]:
        """``ds``, the task's state for it and the original model's result on it."""
        state, base = self._base["task"].baseline(self.model, ds, self.batch_size, self.device, self.dtype)
        return ds, state, base

    def _open_memo(self, path: str | os.PathLike[str], held: EvalSet | None) -> None:
        """Read the measurements an earlier run kept in ``path`` for this model, data and setup
        (the header says which; a file for others is started again), and keep new ones there."""
        import torch

        from sensplan import __version__
        from sensplan._journal import Journal
        from sensplan.sensitivity import architecture_digest, weights_digest

        def digest(es: EvalSet | None) -> list[str] | None:
            """Which items, read how (as the scan's journal names them), and their contents."""
            return None if es is None else [es.source_digest(), es.content_digest()]

        header = {"verification_memo": 1, "architecture": architecture_digest(self.model),
                  "weights": weights_digest(self.model), "sample": digest(self.data), "calib": digest(self.calib),
                  "held": digest(held), "report": digest(self.report), "dtype": str(self.dtype),
                  "channels_last": self.channels_last, "batch_size": self.batch_size, "device": self.device.type,
                  "torch": torch.__version__.split("+")[0], "sensplan": __version__}
        #: in every record's key: a record another run appended after this file was started again for
        #: other settings (two plans of one scan at once) is not read as this header's
        self._header_digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode()).hexdigest()[:16]
        try:
            try:
                jr = Journal.open(path, header)
            except ArtifactError:  # kept for another model, data or setup (or damaged): start again
                jr = Journal.open(path, header, resume=False)
        except OSError:  # a read-only folder: this run measures without one
            return
        for key, rec in jr.items():
            try:
                split, where, alloc = json.loads(key)
                if alloc.get("header") != self._header_digest:
                    continue
                m = _measured_from_record(rec, self.device)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a record this version cannot read: measured again
            self._memo[(where, split, alloc["alloc"])] = m
            self._from_disk.add((where, split, alloc["alloc"]))
        self._disk = jr

    def _remember(self, key: tuple[str, str, str], m: Measured) -> Measured:
        """Keep ``m`` in the memo (and in the memo file, when there is one); returns it."""
        self._memo[key] = m
        if self._disk is not None:
            try:
                self._disk.append(key[1], key[0], {"alloc": key[2], "header": self._header_digest},
                                  _measured_record(m))
            except (OSError, TypeError, ValueError):  # a full disk; a plug-in's per-sample values: kept here only
                self._disk = None
        return m

    def baseline(self, task_name: str) -> dict[str, float]:
        self._prepare(task_name)
        return {split: self._base[split][2].score for split in ("sample", "held", "report") if split in self._base}

    def measure(self, plan_data: Mapping[str, Any], alloc: Mapping[str, Any], *, held: bool = True,
                sample: bool = True, rival: Measured | None = None) -> tuple[Measured | None, Measured | None]:
        """``alloc`` applied as the executor does without fine-tuning, measured on the sample when
        ``sample`` (or when there is no held-out split) and on the held-out split when ``held``.

        With a ``rival`` (another candidate measured on the split that picks the winner: the
        held-out split, or the sample without one), that split is measured on its first quarter
        first (:data:`RACE_HEAD`), and no further when the candidate is already clearly worse
        there than the rival on the same samples (:func:`_clearly_worse`): the measurement
        returned is the quarter's, with ``stopped`` saying so."""
        self._prepare(plan_data["task"]["name"])
        wanted = [s for s in ("sample", "held") if s in self._base and (
            held if s == "held" else sample or not held or "held" not in self._base)]
        got = self._measure(plan_data, alloc, wanted, rival)
        return got.get("sample"), got.get("held")

    def measure_report(self, plan_data: Mapping[str, Any], alloc: Mapping[str, Any]) -> Measured | None:
        """``alloc`` measured on the report split, which no choice touched (None without one)."""
        self._prepare(plan_data["task"]["name"])
        return self._measure(plan_data, alloc, ["report"]).get("report") if "report" in self._base else None

    def _measure(self, plan_data: Mapping[str, Any], alloc: Mapping[str, Any], splits: Sequence[str],
                 rival: Measured | None = None) -> dict[str, Measured]:
        from sensplan.planner._apply import compress
        from sensplan.planner._plan import Plan
        from sensplan.sensitivity import batchnorm_statistics

        key = _alloc_key(plan_data, alloc)
        out = {split: self._memo[(key[0], split, key[1])] for split in splits if (key[0], split, key[1]) in self._memo}
        self.counts["measurements reused"] += len(out)
        earlier = sum((key[0], s, key[1]) in self._from_disk for s in out)
        if earlier:
            self.counts["measurements from an earlier run"] += earlier
        todo = [split for split in splits if split not in out]
        if not todo:
            return out
        plan = Plan({**plan_data, "plans": {"candidate": dict(alloc)}})
        compressed: list[Any] = []

        def module() -> Any:  # compressed when first needed
            if not compressed:
                if self._reference is None:
                    self._reference = batchnorm_statistics(self.model, self.calib) if self.calib is not None else {}
                cm, _ = compress(self.model, plan, "candidate", self.data.example_input, calib=self.calib,
                                 data=self.data, model_spec=self.model_spec, bn_reference=self._reference)
                compressed.append(cm.module)
            return compressed[0]

        race = "held" if "held" in self._base else "sample"
        for split in todo:
            whole = len(self._base[split][0])
            if rival is not None and split == race and rival.per_sample is not None \
                    and len(rival.per_sample) == whole and _head_size(whole) < whole:
                hkey = (key[0], f"{split}:head", key[1])
                if hkey not in self._memo:
                    self._remember(hkey, self._evaluate(plan, module(), f"{split}:head"))
                head = self._memo[hkey]
                stopped = _clearly_worse(head, rival, plan.metric.higher_is_better)
                if stopped is not None:
                    self.counts["candidates stopped early"] += 1
                    out[split] = dataclasses.replace(head, stopped=stopped)
                    continue
            out[split] = self._remember((key[0], split, key[1]), self._evaluate(plan, module(), split))
            self.counts["measurements"] += 1
        return out

    def _evaluate(self, plan: Any, module: Any, split: str) -> Measured:
        """``module`` measured on ``split`` (``"<split>:head"``: its first :data:`RACE_HEAD`)."""
        from sensplan.sensitivity.tasks import paired_se

        task = self._base["task"]
        if split not in self._base:
            self._base[split] = self._original_on(_head(self._base[split.split(":")[0]][0]))
        ds, state, base = self._base[split]
        ev = task.evaluate(module, ds, state, self.batch_size, self.device, self.dtype)
        se = 0.0
        if base.per_sample is not None and ev.per_sample is not None:
            se = paired_se(base.per_sample, ev.per_sample)[2]
        return Measured(plan.metric.drop(base.score, ev.score), se, ev.score, ev.n, ev.per_sample)


def memo_path(scan_path: str | os.PathLike[str]) -> str:
    """Where ``sensplan plan`` keeps the verification's measurements of the scan at ``scan_path``
    for later runs: beside it, ``scan.json.verified`` (JSON lines, appended as measured, like the
    scan's journal). A later plan at another budget, or the same one again, measures only what it
    has not measured before."""
    return os.fspath(scan_path) + ".verified"


def _measured_record(m: Measured) -> dict[str, Any]:
    """``m`` as a memo record: its numbers, and its per-sample scores as base64 of their bytes."""
    import base64

    import torch

    rec: dict[str, Any] = {"drop": m.drop, "se": m.se, "score": m.score, "n": m.n}
    if m.per_sample is not None:
        t = m.per_sample.detach().cpu()
        a = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16: exact in float32
        rec["per_sample"] = {"dtype": str(a.dtype), "shape": list(a.shape),
                             "b64": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()}
    return rec


def _measured_from_record(rec: Mapping[str, Any], device: Any) -> Measured:
    """A memo record (see :func:`_measured_record`) as a measurement on ``device``."""
    import base64

    import torch

    per = None
    if rec.get("per_sample"):
        a = np.frombuffer(base64.b64decode(rec["per_sample"]["b64"]), dtype=np.dtype(rec["per_sample"]["dtype"]))
        per = torch.from_numpy(a.reshape(rec["per_sample"].get("shape", [-1])).copy()).to(device)
    return Measured(float(rec["drop"]), float(rec["se"]), float(rec["score"]), int(rec["n"]), per)


def _alloc_key(plan_data: Mapping[str, Any], alloc: Mapping[str, Any]) -> tuple[str, str]:
    """What a measurement depends on besides the verifier's model and data: (the task and the
    scan, the allocation's choices)."""
    scan = plan_data.get("scan") or {}
    where = f"{plan_data['task']['name']}|{scan.get('sha256') or json.dumps(plan_data.get('model'), sort_keys=True)}"
    return where, json.dumps({name: [c.get("method"), c.get("setting")] for name, c in alloc["choices"].items()},
                             sort_keys=True)


def _head(ds: EvalSet) -> EvalSet:
    """The first :data:`RACE_HEAD` of ``ds`` (at least 500 items), as its own set."""
    from sensplan.sensitivity import EvalSet

    n = _head_size(len(ds))
    return EvalSet(ds.x[:n], ds.y[:n], ds.classes, {**ds.description, "n": n, "role": "race head"},
                   ds.indices[:n] if ds.indices is not None else None)


def _head_size(n: int) -> int:
    return min(n, max(500, int(n * RACE_HEAD)))


def _interleaved(ds: EvalSet, seed: int = 0) -> EvalSet:
    """``ds`` reordered (seeded) so that each class is spread evenly over it: every head of it is
    stratified. Scores over the whole set do not depend on the order."""
    import torch

    from sensplan.sensitivity import EvalSet

    labels = ds.y.cpu().numpy() if ds.y.dim() == 1 else np.zeros(len(ds), dtype=np.int64)
    rng = np.random.default_rng(seed)
    keys = np.empty(len(ds))
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        rng.shuffle(pos)
        keys[pos] = (np.arange(len(pos)) + rng.random()) / len(pos)
    order = np.argsort(keys, kind="stable")
    sel = torch.as_tensor(order, device=ds.x.device)
    return EvalSet(ds.x.index_select(0, sel), ds.y.index_select(0, sel.to(ds.y.device)), ds.classes,
                   dict(ds.description), ds.indices[order] if ds.indices is not None else None, ds.unreadable)


def _clearly_worse(head: Measured, rival: Measured, higher_is_better: bool) -> dict[str, Any] | None:
    """Whether ``head`` (a candidate measured on a split's head) is worse than ``rival`` (measured
    on the whole split, in the same order) on the same samples by more than :data:`RACE_Z` paired
    standard errors and :data:`TOLERANCE`: how much, with its standard error; else None."""
    from sensplan.sensitivity.tasks import paired_se

    n = len(head.per_sample)
    theirs = rival.per_sample[:n]
    sign = 1.0 if higher_is_better else -1.0
    gap = sign * float((theirs.double() - head.per_sample.double()).mean())
    se = paired_se(theirs, head.per_sample)[2]
    if gap - RACE_Z * se > TOLERANCE:
        return {"samples": n, "worse_by": gap, "se": se}
    return None


def _subset(alloc: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``alloc`` with every block outside ``names`` left uncompressed."""
    keep = set(names)
    choices = {}
    for name, c in alloc["choices"].items():
        if name in keep or not c.get("method"):
            choices[name] = c
        else:
            choices[name] = {**c, "method": None, "setting": {}, "label": "none", "effect": {}}
    return {**alloc, "choices": choices}


def _interval(pred: float, meas_se: float, pred_se: float = 0.0) -> tuple[float, float]:
    """The range in which a measurement confirms the prediction (95%, at least :data:`TOLERANCE`
    either side). On the held-out split, the prediction's own noise (``pred_se``, from the scan's
    probes) and the measurement's are independent; on the scan's sample the probes and the
    measurement share the sample, so only the measurement's paired standard error is counted."""
    half = max(Z95 * math.sqrt(pred_se ** 2 + meas_se ** 2), TOLERANCE)
    return pred - half, pred + half


def verify(data: dict[str, Any], cm: Costs, scan: Any, budgets: Sequence[Budget], verifier: Verifier, *,
           max_drop: float | None = None, minimize: str | None = None, time_limit: float = 60.0,
           rounds: int = 3) -> None:
    """Measure, correct and re-solve, measure the uniform candidates, and keep the best measured
    candidate as ``data["plans"]["planned"]``; record everything in ``data["verification"]``."""
    t0 = time.perf_counter()
    _METRIC.set(Metric.from_dict(data["task"]["metric"]))
    counts_before = Counter(verifier.counts)
    baseline = verifier.baseline(data["task"]["name"])
    metric = cost_metric(budgets, minimize)
    corrected = _Rounds(data, cm, scan, budgets, verifier, max_drop, minimize, time_limit)
    corrected.run(rounds)
    tu = time.perf_counter()
    split = "held" if verifier.held is not None else "sample"
    # in budget mode a uniform candidate only matters if it can beat the best planned round
    plans = [c[split] for c in corrected.candidates if c[split] is not None]
    rival = min(plans, key=lambda m: m.drop) if plans and max_drop is None else None
    unis, uniform_recs = _measure_uniform(data, cm, scan, budgets, verifier, max_drop, minimize, metric, rival)
    uniform_seconds = time.perf_counter() - tu
    candidates = [*corrected.candidates, *unis]
    pick = _Pick(candidates, split, max_drop, metric)
    report = verifier.measure_report(data, pick.winner["alloc"])
    data["plans"]["planned"] = _final_allocation(data, pick, split, report)
    by_prediction = pick.by_prediction
    if data["plans"].get("uniform") is not None and by_prediction is not None:
        data["plans"]["uniform"] = {**data["plans"]["uniform"],
                                    "verified": {"sample": by_prediction["sample"].to_dict()
                                                 if by_prediction["sample"] else None,
                                                 "held_out": by_prediction["held"].to_dict()
                                                 if by_prediction["held"] else None}}
    best_uni, winner, measured = pick.best_uniform, pick.winner, pick.measured
    data["verification"] = {
        "rounds": corrected.records,
        "uniform": uniform_recs,
        "baseline": baseline,
        "chosen_on": _split_name(split),
        "split": {"sample": len(verifier.data), "held_out": len(verifier.held) if verifier.held is not None else 0,
                  "report": len(verifier.report) if verifier.report is not None else 0},
        "expected_on": data["plans"]["planned"]["expected"]["measured_on"],
        "held_out_draw": verifier.held_draw,
        "winner": {"name": winner["name"], "kind": winner["kind"]},
        "vs_best_uniform": None if best_uni is None else {
            "name": best_uni["name"], "drop": measured(best_uni).drop, "cost": best_uni["costs"].get(metric),
            # a uniform candidate the race stopped was measured on the split's head only: its gap
            # to the plan is the one on those samples
            "advantage": (measured(best_uni).stopped or {}).get("worse_by",
                                                              measured(best_uni).drop - measured(winner).drop),
            **({"stopped_early": measured(best_uni).stopped} if measured(best_uni).stopped else {})},
        "vs_uniform_by_prediction": None if by_prediction is None else {
            "name": by_prediction["name"], "drop": measured(by_prediction).drop,
            "cost": by_prediction["costs"].get(metric),
            "advantage": measured(by_prediction).drop - measured(winner).drop},
        "within_noise": pick.close,
        "cost_metric": metric, "winner_cost": winner["costs"].get(metric),
        "verdict": _verdict(pick, cm, split, max_drop, metric),
        "seconds": round(time.perf_counter() - t0, 3),
        "uniform_seconds": round(uniform_seconds, 3),
        # how many candidates were measured, taken from an earlier budget's, or stopped by a race
        "measurements": dict(verifier.counts - counts_before),
    }
    data["objective"]["drop_model"] = (
        data["objective"]["drop_model"].split("; the candidates")[0]
        + (", corrected by measured joint drops (pair penalties per option, surcharges per unit)"
           if any("correction" in r for r in corrected.records) else "") + "; the candidates were measured")


class _Rounds:
    """The plan's rounds: measure it; when the measurement falls outside the prediction's interval,
    learn corrections from joint measurements and solve again (up to ``rounds`` solves)."""

    def __init__(self, data: dict[str, Any], cm: Costs, scan: Any, budgets: Sequence[Budget], verifier: Verifier,
                 max_drop: float | None, minimize: str | None, time_limit: float) -> None:
        self.data, self.cm, self.scan, self.budgets, self.verifier = data, cm, scan, budgets, verifier
        self.max_drop, self.minimize, self.time_limit = max_drop, minimize, time_limit
        self.model = _Correction(cm, cm.adjusted(noise_floor=True))  # the corrected rounds' starting point
        self.current = cm
        self.candidates: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.seen: list[dict[int, int]] = []

    def run(self, rounds: int) -> None:
        for k in range(max(1, rounds)):
            started = time.perf_counter()
            found = self._allocation(k)
            if found is None:
                break
            alloc, full = found
            if full in self.seen:
                self.records.append({"round": k + 1,
                                     "stopped": "the corrected model chose an allocation already measured"})
                break
            self.seen.append(full)
            if self._measure(k, alloc, full, k + 1 >= rounds, started):
                break

    def _allocation(self, k: int) -> tuple[dict[str, Any], dict[int, int]] | None:
        """Round ``k``'s allocation (the plan as solved, then the corrected model's) and its choice."""
        from sensplan.planner._plan import allocation

        cm = self.cm
        if k == 0:
            alloc = self.data["plans"]["planned"]
            choice = cm.choice_of({name: _key(c) for name, c in alloc["choices"].items()})
        else:
            try:
                sol = solve(self.current, self.budgets, max_drop=self.max_drop, minimize=self.minimize,
                            time_limit=self.time_limit, penalties=self.model.penalties())
            except InfeasibleBudgetError as e:  # the corrected drops exceed --max-drop everywhere
                self.records.append({"round": k + 1, "stopped": f"no plan meets the corrected model: {e}"})
                return None
            choice = sol.choice
            alloc = allocation(self.current, choice, self.scan)
            alloc["solver"] = {"status": sol.status, "optimal": sol.optimal, "gap": sol.gap}
        return alloc, {i: choice.get(i, 0) for i in range(len(cm.blocks))}

    def _measure(self, k: int, alloc: dict[str, Any], full: dict[int, int], last: bool, started: float) -> bool:
        """Measure round ``k`` (begun at ``started``); learn from it unless it is ``last``. True when
        it confirmed the prediction (no more rounds are needed)."""
        cm, model = self.cm, self.model
        extra = penalty(cm, full, model.penalties())
        pred = self.current.predicted_drop(full, extra)
        pred_se = self.current.predicted_se(full)
        sample, held = self.verifier.measure(self.data, alloc)
        if sample is None:  # pragma: no cover - measured on the sample unless told otherwise
            raise RuntimeError("no measurement on the sample")
        # judged where the winner's curse shows: on the held-out split when there is one
        ref = held if held is not None else sample
        lo, hi = _interval(pred, ref.se, pred_se if held is not None else 0.0)
        within = lo <= ref.drop <= hi
        rec: dict[str, Any] = {"round": k + 1, "predicted": {"drop": pred, "drop_se": pred_se,
                                                             "drop_interval": [lo, hi]},
                               "sample": sample.to_dict(), "held_out": held.to_dict() if held else None,
                               "within_interval": within, "costs": cm.evaluate(full)}
        alloc = dict(alloc)
        alloc["predicted"] = {**alloc["predicted"], "drop": pred, "drop_se": pred_se, "drop_interval": [lo, hi],
                              # the corrected total (surcharges and learned pair penalties) the map read
                              "signal_total": self.current.objective(full) + extra}
        self.candidates.append({"name": f"plan round {k + 1}", "kind": "plan", "alloc": alloc,
                                "sample": sample, "held": held, "costs": rec["costs"]})
        if not within and not last:
            rec["correction"] = model.learn(full, alloc, ref.drop, self.data, self.verifier)
            self.current = cm.adjusted(model.surcharge(), noise_floor=True)
        rec["seconds"] = round(time.perf_counter() - started, 3)
        self.records.append(rec)
        return within


def _measure_uniform(data: dict[str, Any], cm: Costs, scan: Any, budgets: Sequence[Budget], verifier: Verifier,
                     max_drop: float | None, minimize: str | None, metric: str, rival: Measured | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The uniform candidates measured (the one chosen by prediction first, then the most
    promising others): as candidates, and as records for plan.json. With a ``rival`` (the best
    planned round), a candidate clearly worse than it on the first quarter of the split is not
    measured further (:meth:`Verifier.measure`)."""
    from sensplan.planner._plan import uniform_allocation
    from sensplan.planner._solver import uniform_label

    candidates, records = [], []
    unis = uniform_candidates(cm, budgets, max_drop=max_drop, minimize=minimize)
    if max_drop is None:
        unis.sort(key=lambda u: (u.predicted_drop, u.costs.get(metric, 0.0)))
    else:
        unis.sort(key=lambda u: (u.costs.get(metric, 0.0), u.predicted_drop))
    chosen = unis[:MAX_UNIFORM]
    allocs = [uniform_allocation(cm, u, scan) for u in chosen]
    # uniform candidates compete on the held-out split only (the sample too when there is none)
    measured = verifier.measure_many(data, allocs, sample=False, rival=rival)
    for u, ualloc, (sample, held) in zip(chosen, allocs, measured, strict=True):
        label = uniform_label(cm, u)
        candidates.append({"name": f"uniform {label}", "kind": "uniform", "alloc": ualloc,
                           "sample": sample, "held": held, "costs": u.costs})
        records.append({"label": label, "predicted": {"drop": u.predicted_drop},
                        "sample": sample.to_dict() if sample else None,
                        "held_out": held.to_dict() if held else None, "costs": u.costs})
    return candidates, records


class _Pick:
    """The winner among the measured candidates, on the held-out split (the sample when there is
    none): the least drop in budget mode (an exact tie goes to uniform; a margin within one paired
    standard error is recorded as a close call), the cheapest within the max-drop otherwise."""

    def __init__(self, candidates: Sequence[dict[str, Any]], split: str, max_drop: float | None,
                 metric: str) -> None:
        self.candidates, self.split = candidates, split
        plans = [c for c in candidates if c["kind"] == "plan"]
        unis = [c for c in candidates if c["kind"] == "uniform"]
        self.best_plan = min(plans, key=lambda c: self.measured(c).drop)
        # a candidate a race stopped (clearly worse than a plan) is the best uniform only when all were
        self.best_uniform = min(unis, key=lambda c: (self.measured(c).stopped is not None, self.measured(c).drop)) \
            if unis else None
        self.by_prediction = unis[0] if unis else None  # what uniform_choice picks: sorted that way
        candidates = [c for c in candidates if self.measured(c).stopped is None]
        #: the winner's margin over the best of the other kind when it is within one paired standard
        #: error of it (a close call; the choice stands)
        self.close: dict[str, Any] | None = None
        if max_drop is None:
            winner = min(candidates, key=lambda c: (self.measured(c).drop, c["kind"] == "plan"))
            other = self.best_uniform if winner["kind"] == "plan" else self.best_plan
            if other is not None and self.measured(other).stopped is None:
                self.close = _within_noise(self.measured(winner), self.measured(other))
                if self.close is not None:
                    self.close.update(winner=winner["name"], runner_up=other["name"])
        else:
            ok = [c for c in candidates if within_max_drop(self.measured(c), max_drop)]
            winner = (min(ok, key=lambda c: (c["costs"][metric], self.measured(c).drop)) if ok
                      else min(candidates, key=lambda c: self.measured(c).drop))
        self.winner = winner

    def measured(self, c: Mapping[str, Any]) -> Measured:
        m: Measured = c[self.split] if c[self.split] is not None else c["sample"]
        return m

    def gap(self, c: Mapping[str, Any] | None) -> float | None:
        """How much more ``c`` dropped than the best planned round."""
        return None if c is None else self.measured(c).drop - self.measured(self.best_plan).drop


def _final_allocation(data: dict[str, Any], pick: _Pick, split: str, report: Measured | None) -> dict[str, Any]:
    """The winner's allocation, with what it measured and what to expect of it: measured on the
    report split, which no correction, selection or tie-break saw (the split the winner was
    chosen on favours it: it won there, among several candidates)."""
    winner = pick.winner
    final = dict(winner["alloc"])
    final["verified"] = {"sample": winner["sample"].to_dict() if winner["sample"] else None,
                         "held_out": winner["held"].to_dict() if winner["held"] else None,
                         "report": report.to_dict() if report is not None else None,
                         "candidate": winner["name"]}
    m = report if report is not None else pick.measured(winner)
    final["expected"] = {"drop": m.drop, "drop_se": m.se,
                         "drop_interval": [m.drop - Z95 * m.se, m.drop + Z95 * m.se],
                         "score": m.score,
                         "measured_on": ("report split (no choice touched it)" if report is not None else
                                         "held-out split (the candidates were chosen on it: optimistic)"
                                         if split == "held" else
                                         "scan sample (the plan was chosen on it: optimistic)")}
    if winner["kind"] == "uniform":
        first = dict(data["plans"]["planned"].get("solver", {}))
        why = "the plan is the uniform candidate that measured best" + (
            " (within one paired standard error of the best planned round: a close call)"
            if pick.close is not None else "")
        final["solver"] = {**first, "status": f"{first.get('status', '?')} (round 1); {why}"}
        lo, hi = _interval(final["predicted"]["drop"], m.se,
                           final["predicted"].get("drop_se", 0.0) if split == "held" else 0.0)
        final["predicted"] = {**final["predicted"], "drop_interval": [lo, hi]}
    return final


def _verdict(pick: _Pick, cm: Costs, split: str, max_drop: float | None, metric: str) -> str:
    winner, best_uni, close = pick.winner, pick.best_uniform, pick.close
    where = _split_name(split)
    if max_drop is not None:
        return _max_drop_verdict(winner, pick.candidates, pick.measured, metric, cm.original.get(metric) or 1.0,
                                 max_drop, where)
    noise = "" if close is None else f", within one paired standard error ({_pts(close['se'])}): a close call"
    if winner["kind"] == "uniform":
        by = -(pick.gap(winner) or 0.0)
        return ((f"uniform wins: {winner['name']} measured {_pts(by)} better than the best planned round on "
                 f"the {where}{noise}" if by > 0 else
                 f"uniform wins: {winner['name']} measured the same as the best planned round on the {where} "
                 f"(a tie goes to uniform)") + "; the plan is that uniform allocation")
    if best_uni is None:
        return f"{winner['name']} kept; no uniform candidate meets the budget"
    vs_best = pick.gap(best_uni)
    if abs(vs_best or 0.0) < 1e-12:
        return f"{winner['name']} ties with the best uniform ({best_uni['name']}) on the {where}"
    stopped = pick.measured(best_uni).stopped
    if stopped:  # its drop is from the split's head: compare on the same samples
        return (f"{winner['name']} wins: every uniform candidate was clearly worse on the first {stopped['samples']} "
                f"samples of the {where}, where the race stopped them; the best of them ({best_uni['name']}) by "
                f"{_pts(stopped['worse_by'])} (± {_pts(stopped['se'])})")
    return (f"{winner['name']} wins: {_pts(vs_best or 0.0)} better than the best uniform "
            f"({best_uni['name']}) on the {where}{noise}")


#: one-sided 95% quantile of the normal distribution
Z95_ONE_SIDED = 1.645


def within_max_drop(m: Measured, max_drop: float) -> bool:
    """Whether a measured candidate keeps the max-drop with 95% confidence: its drop plus 1.645
    paired standard errors is within it. The point estimate alone would let the cheapest of a
    dozen candidates pass on luck."""
    return m.drop + Z95_ONE_SIDED * m.se <= max_drop


def _within_noise(winner: Measured, runner_up: Measured) -> dict[str, float] | None:
    """When the winner measured better than the runner-up by no more than one standard error of
    their paired difference (same samples), the call was close: the advantage and that standard
    error, else None (also when there are no per-sample scores to pair)."""
    from sensplan.sensitivity.tasks import paired_se

    if winner.per_sample is None or runner_up.per_sample is None \
            or len(winner.per_sample) != len(runner_up.per_sample):
        return None
    se = paired_se(runner_up.per_sample, winner.per_sample)[2]
    advantage = runner_up.drop - winner.drop
    return {"advantage": advantage, "se": se} if advantage <= se else None


def _key(c: Mapping[str, Any]) -> str:
    from sensplan.planner._costs import option_key

    return option_key(c.get("method"), c.get("setting", {}))


#: the metric of the plan being verified: the messages give drops in its unit
_METRIC: ContextVar[Metric] = ContextVar("sensplan_verify_metric", default=TOP1)


def _pts(v: float) -> str:
    return _METRIC.get().format_drop(v)


def _split_name(split: str) -> str:
    return "held-out split" if split == "held" else "scan sample"


class _Correction:
    """What the measurements taught about the drop model, as two corrections the MILP can price:

    - per option measured jointly on two or more units (e.g. the layers chosen at 2 bits), the
      excess of the joint drop over the sum of the units' drops becomes a :class:`CountPenalty`: a
      rate per pair of units that choose that option (errors that compound grow with the pairs).
      The joint drop is measured on the scan's sample, where the units' own drops were measured:
      on another split the gap would also hold the winner's curse and the split's shift, which grow
      with the number of units, not with the pairs;
    - what the plan's measurement leaves unexplained after that (on the held-out split when there
      is one: the winner's curse, the shift) is spread over the chosen options, by their drops, as
      a surcharge per unit on every block that offers the option.

    After learning from a plan, the corrected model predicts that plan's measured drop. A
    cancellation (a joint drop below the sum) is not rewarded: it only lowers the surcharges.
    """

    def __init__(self, cm: Costs, base: Costs) -> None:
        self.cm = cm
        self.drops = base.drop_table("drop")
        self.scanned = cm.drop_table("drop")  # as measured on the scan's sample
        self.rates: dict[str, float] = {}
        self.per_unit: dict[str, float] = {}

    def penalties(self) -> list[CountPenalty]:
        return [CountPenalty(k, r) for k, r in sorted(self.rates.items()) if r > 0]

    def surcharge(self) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for i, b in enumerate(self.cm.blocks):
            for o, opt in enumerate(b.options):
                if o and opt.key in self.per_unit:
                    out.setdefault(i, np.zeros(len(b.options)))[o] = self.per_unit[opt.key]
        return out

    def learn(self, choice: Mapping[int, int], alloc: Mapping[str, Any], measured: float,
              data: Mapping[str, Any], verifier: Verifier) -> list[dict[str, Any]]:
        """Learn from ``measured`` (the plan's drop, on the held-out split when there is one). Joint
        drops are measured on the scan's sample (see the class docstring)."""
        cm = self.cm
        buckets: dict[str, list[int]] = {}
        for i, o in choice.items():
            if o:
                buckets.setdefault(cm.blocks[i].options[o].key, []).append(i)
        additive = {key: float(sum(self.drops[i][choice[i]] for i in m)) for key, m in buckets.items()}
        out: list[dict[str, Any]] = []
        joint: dict[str, float] = {}
        for key in sorted(buckets, key=lambda key: (-len(buckets[key]), -additive[key]))[:MAX_BUCKETS]:
            members = buckets[key]
            if len(members) < 2:
                continue
            m, _ = verifier.measure(data, _subset(alloc, [cm.blocks[i].name for i in members]), held=False)
            if m is None:  # pragma: no cover - measured on the sample when asked
                raise RuntimeError("no joint measurement")
            scanned = float(sum(self.scanned[i][choice[i]] for i in members))
            joint[key] = cm.objective_of(m.drop)  # in the planning signal's units (drops by default)
            pairs = len(members) * (len(members) - 1) / 2
            self.rates[key] = max(0.0, joint[key] - scanned) / pairs
            out.append({"option": key, "units": len(members), "additive": scanned, "joint": joint[key],
                        "joint_drop": m.drop, "split": "scan sample", "rate_per_pair": self.rates[key]})
        pen = {key: CountPenalty(key, self.rates.get(key, 0.0)).value(len(m)) if self.rates.get(key, 0.0) > 0
               else 0.0 for key, m in buckets.items()}
        residual = cm.objective_of(measured) - sum(additive[key] + pen[key] for key in buckets)
        weights = {key: max(joint.get(key, additive[key] + pen[key]), 0.0) for key in buckets}
        total = sum(weights.values())
        n_units = sum(len(m) for m in buckets.values())
        for key, members in buckets.items():
            share = weights[key] / total if total > 0 else len(members) / n_units
            self.per_unit[key] = residual * share / len(members)
        for rec in out:
            rec["surcharge_per_unit"] = self.per_unit[str(rec["option"])]
        if residual:
            out.append({"unexplained": residual, "spread_over": sorted(buckets)})
        return out


def verifier_from_scan(scan: Any, *, weights: str | None = None, allow_pickle: bool = False,
                       holdout: Any = None, holdout_samples: int | None = 5000,
                       device: str | torch.device | None = None, workers: int = 1,
                       channels_last: bool | None = None, memo: bool = False) -> tuple[Verifier, list[str]]:
    """The model, sample and calibration data the scan measured, rebuilt from what ``scan.json``
    records (each checked against its digest), plus a held-out split: ``holdout`` (a DataSpec), or
    else up to ``holdout_samples`` items of the scan's data that neither the sample nor the
    calibration used. Returns the verifier and notes for the user.

    With ``workers`` > 1 (and a scan read from a file), the uniform candidates are measured side by
    side in that many spawned processes, each rebuilding the same verifier from the file (on a
    machine with GPUs, one GPU each in turn); call :meth:`Verifier.close` when done. With ``memo``
    (and a scan read from a file), the measurements are kept beside it for later runs
    (:func:`memo_path`)."""
    from sensplan._errors import UserInputError
    from sensplan.sensitivity import DataSpec, load_eval_set

    notes: list[str] = []
    model, spec = model_from_scan(scan, weights=weights, allow_pickle=allow_pickle, notes=notes)
    drec = scan.data["data"]
    data, calib, exclude, dspec = scan_sample(drec, scan.data.get("calibration"),
                                              " Verify on the scan's data, or pass --no-verify.")
    held = None
    draw: dict[str, Any] | None = None
    if holdout is not None:
        try:
            hspec = holdout if isinstance(holdout, DataSpec) else DataSpec.parse(holdout, dspec.preprocess)
            # the scan's labels and image handling apply to the held-out data too
            hspec = dataclasses.replace(hspec, class_map=dspec.class_map, skip_unreadable=dspec.skip_unreadable)
            held = load_eval_set(hspec, holdout_samples, drec.get("seed", 0) + 2,
                                 exclude=exclude if hspec.same_source(dspec) else None)
        except UserInputError as e:
            raise UserInputError(f"--holdout-data {holdout}: {e}") from None
    else:
        try:
            held = load_eval_set(dspec, holdout_samples, drec.get("seed", 0) + 2, exclude=exclude)
            draw = {"from": "the scan's data outside its sample and calibration", "n": holdout_samples,
                    "seed": drec.get("seed", 0) + 2, "split_seed": drec.get("seed", 0) + 3}
        except UserInputError:
            # the calibration drawn from the same data outside the sample, if any (a calibration that
            # reused the sample, because the sample took everything, leaves nothing to save)
            n_calib = len(np.setdiff1d(exclude, data.indices)) if data.indices is not None else 0
            why = (f" (its sample took {len(data)} and the calibration {n_calib}: a smaller --calib-samples, or "
                   f"--calib-data SPEC from other data, at scan time leaves items for it)" if n_calib > 0 else "")
            notes.append(f"--data {drec.get('spec')} has no items outside the scan's sample and calibration{why}: "
                         f"candidates are compared on the scan's sample (pass --holdout-data SPEC)")
    held, report = split_held(held, drec.get("seed", 0) + 3, notes)
    if held is not None and len(held) < 200:
        # a fraction metric (top-1): two paired standard errors are at most 2/sqrt(n); others: no bound
        unit = str(((scan.data.get("task") or {}).get("metric") or {}).get("unit") or "")
        size = (f"differences between candidates of less than about {100 * 2 / len(held) ** 0.5:.0f} points"
                if unit == "fraction" else "small differences between candidates")
        notes.append(f"the held-out split has only {len(held)} items: {size} there may be noise (a larger "
                     f"--holdout-samples, more data outside the scan's sample, or --holdout-data SPEC makes "
                     f"the verdict firmer)")
    import torch

    dtype = getattr(torch, str(scan.data.get("provenance", {}).get("dtype") or "float32"), None)
    if channels_last is None:  # the memory order the scan measured in (timed again when it does not say)
        layout = (scan.data.get("provenance") or {}).get("input_layout")
        channels_last = None if layout is None else layout == "channels_last"
    verifier = Verifier(model, data, calib, held, report=report, model_spec=spec, device=device,
                        dtype=dtype if isinstance(dtype, torch.dtype) else None, channels_last=channels_last,
                        memo=memo_path(scan.path) if memo and scan.path else None)
    verifier.held_draw = draw if report is not None else None
    if workers > 1 and scan.path:
        verifier.pool = _Pool(workers, {"scan": os.path.abspath(scan.path), "sha256": scan.sha256, "weights": weights,
                                        "allow_pickle": allow_pickle, "holdout": holdout,
                                        "holdout_samples": holdout_samples, "device": device,
                                        "channels_last": verifier.channels_last})
    elif workers > 1:
        notes.append("the scan was not read from a file, so its verification runs in this process only")
    got = verifier.baseline(scan.data["task"]["name"])["sample"]
    if abs(got - float(scan.baseline["score"])) > 1e-6:
        notes.append(f"the rebuilt model scores {got:.4f} on the scan's sample, the scan measured "
                     f"{float(scan.baseline['score']):.4f}: the predictions may not apply to this model")
    return verifier, notes


def model_from_scan(scan: Any, *, weights: str | None = None, allow_pickle: bool = False,
                    notes: list[str] | None = None, purpose: str = "Verifying the plan",
                    fix: str = "pass --no-verify",
                    in_python: str = "make_plan(..., verifier=Verifier(model, data, calib, held))"
                    ) -> tuple[nn.Module, Any]:
    """The scan's model rebuilt from what ``scan.json`` records (its weights checked by digest) and
    its spec; ``purpose`` and ``fix`` word the messages (a note about random weights goes to
    ``notes``)."""
    from sensplan._errors import UserInputError
    from sensplan.sensitivity import ModelSpec, load_model

    rec = scan.data["model"]
    if not rec.get("spec") or not (scan.data.get("data") or {}).get("kind"):
        raise UserInputError(f"This scan does not record how to rebuild its model and data (it was made "
                             f"from objects in Python). {fix[0].upper()}{fix[1:]}, or do it in Python with "
                             f"{in_python}.")
    beside = os.path.dirname(os.path.abspath(scan.path)) if scan.path else None
    spec = ModelSpec.from_record(rec["spec"], beside=beside, artifact=repr(scan.path or "scan.json"),
                                 fix=f", or {fix}")
    path = _scan_weights(rec, weights, beside, purpose, fix)
    try:
        model = load_model(spec, path or None, allow_pickle=allow_pickle)
    except UserInputError as e:
        raise UserInputError(f"{purpose} needs the scan's model {spec.source!r}: {e} Run it where the scan "
                             f"ran, or {fix}.") from None
    if path is None and str(spec.source).startswith("hf:"):
        # a hf: folder's weights are its own files: checked against the scan's digest, which a
        # changed folder does not match (a factory's weights set in Python cannot be rebuilt: noted)
        from sensplan.sensitivity import weights_digest

        if not rec.get("weights_digest"):
            if notes is not None:
                notes.append(f"the scan recorded no digest of {spec.source!r}'s weights: they are loaded from "
                             f"its files, not checked")
            return model, spec
        now = weights_digest(model)
        if now != rec["weights_digest"]:
            raise UserInputError(f"{purpose} needs the weights the scan measured, but {spec.source!r} now "
                                 f"builds others (digest {now}, the scan's "
                                 f"{rec['weights_digest']}): its files changed since the scan. Restore them, "
                                 f"scan again, or {fix}.")
    elif path is None and notes is not None:
        notes.append("the scan used randomly initialised weights; they are rebuilt, not checked")
    return model, spec


def scan_sample(drec: Mapping[str, Any], crec: Mapping[str, Any] | None, hint: str
                ) -> tuple[EvalSet, EvalSet | None, np.ndarray, Any]:
    """The scan's evaluation sample and calibration set, drawn again from what ``scan.json``
    records of them (``drec``, ``crec``) and checked against their digests; the positions of the
    data they used (to exclude from anything measured out of sample); and the data's spec.
    A mismatch raises UserInputError ending with ``hint``."""
    from sensplan._errors import UserInputError
    from sensplan.sensitivity import DataSpec, load_calibration_set, load_eval_set

    dspec = DataSpec.from_record(dict(drec))
    n = drec.get("n_requested", drec.get("n"))  # the sample drawn, before unreadable images were left out
    whole = n is None or n >= drec.get("n_available", 0)
    try:
        data = load_eval_set(dspec, None if whole else n, drec.get("seed", 0))
    except UserInputError as e:
        raise UserInputError(f"The scan's data {drec.get('spec')!r} cannot be read: {e}{hint}") from None
    if data.description.get("indices_sha256") != drec.get("indices_sha256"):
        raise UserInputError(f"The data {drec.get('spec')!r} is not what the scan measured (its sample "
                             f"differs).{hint}")
    calib = None
    used = [data.indices]
    if crec:
        cspec = DataSpec.from_record(dict(crec))
        cn = crec.get("n_requested", crec.get("n"))
        # as load_calibration_set drew it: from its own source, or from --data outside the sample
        drawn_from_data = str(crec.get("role", "")).startswith("calibration (")
        calib = (load_calibration_set(data, cn, drec.get("seed", 0)) if drawn_from_data else
                 load_calibration_set(data, cn, crec.get("seed", 0), cspec))
        if calib.description.get("indices_sha256") != crec.get("indices_sha256"):
            raise UserInputError(f"The calibration data {crec.get('spec')!r} is not what the scan used (its "
                                 f"sample differs).{hint}")
        if cspec.same_source(dspec) and calib.indices is not None:
            used.append(calib.indices)
    return data, calib, np.concatenate([u for u in used if u is not None]), dspec


#: the fewest held-out items split into a selection part and a report part (half each)
MIN_SPLIT = 100


def split_held(held: EvalSet | None, seed: int, notes: list[str]) -> tuple[EvalSet | None, EvalSet | None]:
    """The held-out data in two halves, stratified: candidates are corrected and chosen on the
    first, and the winner's expected drop is measured on the second, which no choice touched."""
    if held is None:
        return None, None
    if len(held) < MIN_SPLIT:
        notes.append(f"the held-out split has only {len(held)} items, too few to keep a part no choice "
                     f"touches: the plan's expected drop is measured where it was chosen (optimistic)")
        return held, None
    return held.split((len(held) + 1) // 2, seed, ("held-out (selection)", "held-out (report)"))


def _scan_weights(rec: Mapping[str, Any], weights: str | None, beside: str | None,
                  purpose: str = "Verifying the plan", fix: str = "pass --no-verify") -> str | None:
    """The weights file the scan measured: ``weights`` when given (checked by digest), else the
    recorded file found beside the scan, at its resolved path, or as written (see ``locate``).
    ``purpose`` and ``fix`` word the messages, as in :func:`model_from_scan`."""
    from sensplan._artifacts import file_sha256, locate
    from sensplan._errors import UserInputError

    want = rec.get("weights_sha256")
    if weights:
        if not os.path.isfile(weights):
            raise UserInputError(f"--weights {weights}: no such file. Pass the weights the scan measured, or "
                                 f"{fix}.")
        if want and file_sha256(weights) != want:
            raise UserInputError(f"The weights {weights!r} are not the ones the scan measured (their sha256 "
                                 f"differs). Pass the scan's --weights, or {fix}.")
        return weights
    recorded = rec.get("weights")
    if not recorded:
        return None
    found = locate(recorded, resolved=rec.get("weights_resolved"), sha256=want, beside=beside)
    if found is None:
        places = [f"beside the scan ({os.path.join(beside, os.path.basename(recorded))})" if beside else "",
                  f"where they were ({rec['weights_resolved']})" if rec.get("weights_resolved") else "",
                  f"{recorded} from {os.getcwd()!r}" if not os.path.isabs(recorded) else ""]
        raise UserInputError(f"{purpose} needs the weights the scan measured, {recorded!r}, which are in "
                             f"none of these places{' (with the recorded sha256)' if want else ''}: "
                             f"{'; '.join(p for p in places if p)}. Pass --weights FILE, or {fix}.")
    return str(found)


def _max_drop_verdict(winner: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]], measured: Any,
                      metric: str, original: float, max_drop: float, split: str) -> str:
    """In max-drop mode candidates compete on cost among those that keep it with 95% confidence."""
    ok = [c for c in candidates if within_max_drop(measured(c), max_drop)]
    if winner not in ok:
        return (f"no candidate measured within the max-drop {_pts(max_drop)} on the {split} with 95% "
                f"confidence; kept the one that dropped least, {winner['name']} ({_pts(measured(winner).drop)})")
    unis = [c for c in ok if c["kind"] == "uniform"]
    text = (f"{winner['name']} wins: {metric} {winner['costs'][metric] / original:.3f} of the original at a "
            f"measured drop of {_pts(measured(winner).drop)} on the {split} (within the max-drop with 95% "
            f"confidence)")
    if winner["kind"] == "plan" and unis:
        cheapest = min(unis, key=lambda c: c["costs"][metric])
        text += (f"; the cheapest uniform plan within the max-drop ({cheapest['name']}) costs "
                 f"{cheapest['costs'][metric] / original:.3f}")
    elif winner["kind"] == "plan":
        text += "; no uniform plan measured within the max-drop"
    elif any(c["kind"] == "plan" for c in ok):
        text += "; it is cheaper than every planned round within the max-drop"
    else:
        text += "; no planned round measured within the max-drop"
    return text


def _on_device(m: Measured | None, device: Any) -> Measured | None:
    """``m`` with its per-sample scores on ``device`` (they cross processes on the CPU)."""
    if m is None or m.per_sample is None or not hasattr(m.per_sample, "to"):
        return m
    return dataclasses.replace(m, per_sample=m.per_sample.to(device))


class _Pool:
    """Spawned processes that each rebuild the verifier from ``scan.json`` (:func:`verifier_from_scan`
    with ``args``; the file checked against the sha256 the main process read) and measure
    allocations on it; each returns its result with the measurements it added to its memo, so the
    main verifier reuses them as its own."""

    def __init__(self, workers: int, args: Mapping[str, Any]) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import torch

        self.workers = workers
        self.scan = str(args["scan"])
        threads = max(1, torch.get_num_threads() // workers)
        ctx = multiprocessing.get_context("spawn")
        self._counter = ctx.Value("i", 0)
        self._executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_init,
                                             initargs=(dict(args), threads, self._counter))

    def submit(self, plan_data: Mapping[str, Any], alloc: Mapping[str, Any], held: bool, sample: bool,
               rival: Measured | None) -> Any:
        return self._executor.submit(_pool_measure, dict(plan_data), dict(alloc), held, sample, rival)

    def result(self, future: Any) -> Any:
        """A measurement's result; a worker that died is one clear error."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool:
            raise UserInputError(
                f"A verification worker stopped (killed, or out of memory) while measuring the uniform "
                f"candidates of {self.scan}. Plan again without --workers, or with fewer.") from None

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_POOL_VERIFIER: Verifier | None = None
_POOL_ERROR = ""


def _pool_init(args: dict[str, Any], threads: int, counter: Any) -> None:
    global _POOL_VERIFIER, _POOL_ERROR
    import torch

    from sensplan._errors import SensplanError
    from sensplan._tables import Scan
    from sensplan.sensitivity import device_in_turn

    torch.set_num_threads(threads)
    with counter.get_lock():
        rank = counter.value
        counter.value += 1
    device = args.pop("device")
    if device is not None:  # the scan workers' rule: "cuda" is the GPUs in turn, cuda:K pins all to K
        device = device_in_turn(device, rank)
    path, sha = args.pop("scan"), args.pop("sha256")
    try:
        scan = Scan.load(path)
        if sha and scan.sha256 != sha:
            raise UserInputError(f"{path} changed since planning started")
        _POOL_VERIFIER, _ = verifier_from_scan(scan, device=device, **args)
    except (SensplanError, OSError, ValueError, RuntimeError) as e:  # reported by the first measurement
        _POOL_ERROR = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _pool_measure(plan_data: dict[str, Any], alloc: dict[str, Any], held: bool, sample: bool,
                  rival: Measured | None) -> tuple[tuple[Measured | None, Measured | None],
                                                   dict[tuple[str, str, str], Measured], Counter[str]]:
    v = _POOL_VERIFIER
    if v is None:
        raise UserInputError(f"A verification worker could not rebuild the verifier: {_POOL_ERROR}. Plan "
                             f"without --workers, or fix the cause.")
    before, counts = set(v._memo), Counter(v.counts)
    result = v.measure(plan_data, alloc, held=held, sample=sample, rival=_on_device(rival, v.device))
    added = {k: _on_device(m, "cpu") for k, m in v._memo.items() if k not in before}
    cpu = (_on_device(result[0], "cpu"), _on_device(result[1], "cpu"))
    return cpu, added, v.counts - counts  # type: ignore[return-value]
