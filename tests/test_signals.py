"""Planning on a low-noise signal: the monotone map from a signal to the drop, and a plan that picks
the truly better allocation where the top-1 drops are tied by noise.

The model is exact: logits = fc2(fc1(x)) with both layers the 2x2 identity, and the label says
which input is larger. Two toy methods each compress one layer (8-bit weights) by nudging it:
``nudge_a`` adds 0.05 * x1 to logit 0 (it flips class-1 samples whose margin is below that), and
``nudge_b`` adds 0.3 * x0 to logit 1 (it flips class-0 samples whose margin is below that). The
scan's sample has one class-1 sample with a margin of 0.02 (so ``nudge_a`` measures one lost sample)
and every other margin above 0.5 (so ``nudge_b`` measures none): by top-1, ``nudge_b`` looks free.
Its KL divergence from the original's outputs says otherwise, and on held-out data with margins
spread over 0..0.5 it flips several times as many samples.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sensplan._tables import Scan
from sensplan.planner import Budget, Costs, compress, make_plan
from sensplan.planner._signal import DropMap, centred_isotonic, isotonic
from sensplan.sensitivity import ScanConfig, WeightMethod, get_task, scan
from sensplan.sensitivity._data import EvalSet
from tests.conftest import registered
from tests.test_verify import Chain  # logits = fc2(fc1(x)), both the 2x2 identity


class _Nudge(WeightMethod):
    axis = "weight"
    stage = 30
    default_settings = ({"level": 1},)
    setting_key = "level"
    layer = ""
    row, col, amount = 0, 0, 0.0

    def check_setting(self, setting):
        return {"level": 1}

    def label(self, setting):
        return self.name

    def effect(self, setting, unit):
        return {"weight_bits": 8, "weight_dtype": "float32"}

    def units(self, ctx, settings):
        return {n: "" if n == self.layer else "another layer" for n in ctx.layers}

    def transform(self, ctx, layer, w, setting):
        out = w.detach().clone()
        out[self.row, self.col] += self.amount
        return out


class NudgeA(_Nudge):
    name, layer, row, col, amount = "nudge_a", "fc1", 0, 1, 0.05


class NudgeB(_Nudge):
    name, layer, row, col, amount = "nudge_b", "fc2", 1, 0, 0.3


def margins(n: int, lo: float, hi: float, seed: int, tiny: bool = False) -> EvalSet:
    g = torch.Generator().manual_seed(seed)
    x0 = 1.0 + 0.2 * torch.rand(n, generator=g)
    d = lo + (hi - lo) * torch.rand(n, generator=g)
    y = torch.arange(n) % 2  # class 1: x1 > x0
    if tiny:
        d[1] = 0.02  # one class-1 sample right at the border
    x1 = torch.where(y == 1, x0 + d, x0 - d)
    return EvalSet(torch.stack([x0, x1], 1), y, ["0", "1"], {"spec": f"margins:{seed}", "n": n}, np.arange(n))


@pytest.fixture
def nudges():
    with registered(NudgeA, NudgeB):
        yield


def test_planning_on_a_signal_picks_what_top1_noise_hides(nudges):
    model, sample = Chain(), margins(200, 0.5, 0.7, 0, tiny=True)
    table = scan(model, sample, ScanConfig({"nudge_a": [{"level": 1}], "nudge_b": [{"level": 1}]}), progress=False)
    rows = {r["method"]: r for r in table.results}
    assert rows["nudge_a"]["drop"] == pytest.approx(1 / 200) and rows["nudge_b"]["drop"] == 0  # top-1
    # the KL from the original's outputs sees the larger shift (the cross-entropy nets out: nudge_b
    # also widens the class-1 margins); the loss still ranks them right, if narrowly
    kl = {m: rows[m]["signals"]["kl"]["value"] for m in rows}
    assert kl["nudge_b"] > 10 * kl["nudge_a"]
    assert rows["nudge_b"]["signals"]["loss"]["value"] > rows["nudge_a"]["signals"]["loss"]["value"]
    # 2 layers x 4 weights x 32 bits = 32 bytes; 8-bit weights save 3 bytes per layer: one must go
    budget = [Budget.parse("size=29B")]

    def chosen(signal):
        plan = make_plan(table, budget, signal=signal)
        return plan, {c["method"] for c in plan.variant()["choices"].values() if c["method"]}

    by_top1, methods_top1 = chosen("drop")
    by_kl, methods_kl = chosen("kl")
    assert methods_top1 == {"nudge_b"} and methods_kl == {"nudge_a"} and chosen("loss")[1] == {"nudge_a"}
    assert by_kl.data["objective"]["signal"] == "kl" and by_kl.data["objective"]["drop_map"]["knots"]

    # on held-out data with margins spread over 0..0.5, the loss plan is truly the better one
    held = margins(4000, 0.0, 0.5, 1)
    task = get_task("classification")
    base = task.evaluate(model, held, None).score

    def held_drop(plan):
        cm, _ = compress(model, plan, "planned", held.example_input)
        return base - task.evaluate(cm.module, held, None).score

    assert held_drop(by_kl) < held_drop(by_top1) / 3


def test_a_signal_the_scan_did_not_record_is_refused_naming_those_it_did(nudges):
    from sensplan import ArtifactError

    table = scan(Chain(), margins(40, 0.5, 0.7, 0), ScanConfig({"nudge_a": [{"level": 1}]}), progress=False)
    assert set(table.results[0]["signals"]) == {"loss", "kl", "margin"}
    with pytest.raises(ArtifactError, match=r"'entropy' is not a planning signal of the scan's task "
                                            r"\(classification\): it records drop, kl, loss, margin"):
        Costs(table, signal="entropy")
    # a signal the task offers but this scan's probes lack (a scan made before sensplan recorded it)
    data = copy.deepcopy(dict(table.data))
    for r in data["results"]:
        r["signals"].pop("margin")
    with pytest.raises(ArtifactError, match="'margin' is not in every probe.*drop, kl, loss.*scan again"):
        Costs(Scan(data), signal="margin")


def test_isotonic_fit_is_the_least_squares_monotone_fit():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 60)
    y = x ** 2 + rng.normal(0, 0.05, 60)
    xs, fs = isotonic(x, y)
    assert np.all(np.diff(xs) > 0) and np.all(np.diff(fs) >= -1e-12)
    # no other monotone fit on the same knots does better (a few perturbations of it)
    fitted = np.interp(x, xs, fs)
    best = float(((fitted - y) ** 2).sum())
    for _ in range(50):
        other = np.maximum.accumulate(fs + rng.normal(0, 0.02, len(fs)))
        assert best <= float(((np.interp(x, xs, other) - y) ** 2).sum()) + 1e-12


def test_the_drop_map_has_no_plateau_where_isotonic_pools_probes():
    """Probes out of order pool into one flat block of the isotonic fit; the map keeps rising
    through it (centred isotonic regression), so a plan whose total grows by a correction is
    predicted to drop more, not the same."""
    pts = [(0.1, 0.3), (0.2, 0.1), (0.3, 0.2), (0.5, 0.5)]
    xs, fs = isotonic([p[0] for p in pts], [p[1] for p in pts])
    assert fs[0] == fs[1] == fs[2] == pytest.approx(0.2)  # the plateau from 0.1 to 0.3
    cx, cf = centred_isotonic([p[0] for p in pts], [p[1] for p in pts])
    assert list(cx) == pytest.approx([0.2, 0.5]) and list(cf) == pytest.approx([0.2, 0.5])
    m = DropMap.fit("kl", pts)
    values = [m(t) for t in np.linspace(0.0, 0.6, 61)]
    assert np.all(np.diff(values) > 0)  # strictly rising: no total is predicted like a smaller one
    assert m(0.25) > m(0.15) and m(0.0) == 0.0
    assert m(0.2) == pytest.approx(0.2) and m(0.5) == pytest.approx(0.5)


def test_the_drop_map_is_monotone_anchored_at_zero_and_inverts():
    m = DropMap.fit("loss", [(0.01, 0.0), (0.02, 0.004), (0.05, 0.002), (0.1, 0.02), (0.4, 0.1), (-0.01, 0.0)])
    assert m(0.0) == 0.0
    values = [m(t) for t in np.linspace(0, 1, 101)]
    assert np.all(np.diff(values) >= -1e-12)
    assert m(0.8) > m(0.4)  # past the last probe it keeps growing, with the slope from the origin
    for drop in (0.0, 0.003, 0.02, 0.05, 0.2):
        t = m.inverse(drop)
        assert m(t) == pytest.approx(drop, abs=1e-12) or (drop == 0.0 and m(t) == 0.0)
        assert m(t * 1.001 + 1e-9) >= drop - 1e-12
    identity = DropMap.fit("drop", [])
    assert identity(0.3) == 0.3 and identity.inverse(0.3) == 0.3


def test_a_task_without_signals_is_told_to_plan_on_the_drop_not_to_scan_again(nudges):
    """An embedding scan's task records no signals: asking for one names --signal drop, and does
    not send the user to scan again (which would record none either)."""
    from sensplan import ArtifactError

    table = scan(Chain(), margins(40, 0.5, 0.7, 0), ScanConfig({"nudge_a": [{"level": 1}]}), progress=False)
    data = copy.deepcopy(dict(table.data))
    data["task"] = {**data["task"], "name": "embedding", "signals": {}}
    for r in data["results"]:
        r.pop("signals", None)
    with pytest.raises(ArtifactError, match=r"task \(embedding\) records no planning signal.*--signal drop") as e:
        Costs(Scan(data), signal="loss")
    assert "scan again" not in str(e.value)
    assert Costs(Scan(data)).signal == "drop"  # auto


def test_a_predicted_drop_never_passes_the_scores_floor():
    """A fraction (top-1, agreement) cannot fall below 0: the map's slope continued past its last
    knot, or many probes' drops added up, predicted a drop of 858 points in a trial (an agreement
    of -758%). The prediction stops at the baseline score."""
    from tests.tables import synthetic_scan

    table = synthetic_scan(seed=0)
    cm = Costs(table)
    base = table.data["baseline"]["score"]
    assert cm.ceiling == pytest.approx(base)
    assert cm.drop_of(10 * base) == pytest.approx(base) and cm.drop_of(0.01) == pytest.approx(0.01)
    worst = {i: len(b.options) - 1 for i, b in enumerate(cm.blocks)}
    assert cm.predicted_drop(worst) <= base
    assert cm.objective_of(2 * base) == pytest.approx(2 * base)  # verification's conversion is left as it was
    # a plug-in task's score may go below 0 (R^2): not capped
    other = copy.deepcopy(table)
    other.data["task"]["metric"] = {"name": "r2", "higher_is_better": True, "unit": "fraction"}
    assert Costs(other).ceiling is None and Costs(other).drop_of(10 * base) == pytest.approx(10 * base)
