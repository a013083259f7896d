"""``scan --fast``: the Fisher estimate of each probe's KL divergence, the few measured probes that
map it to the drop, and planning on it."""

from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from sensplan._errors import ArtifactError, UserInputError
from sensplan._tables import Scan
from sensplan._validate import check_scan
from sensplan.planner import Budget, make_plan
from sensplan.sensitivity import ScanConfig, scan
from sensplan.sensitivity._fisher import ProbeEstimator, fisher_diagonal
from tests.conftest import seeded_model, self_labelled

METHODS = ["prune", "weight_quant", "act_quant"]


def _key(r):
    return r["unit"], r["method"], json.dumps(r["setting"], sort_keys=True)


@pytest.fixture(scope="module")
def scans():
    """A full and a fast scan of the same tiny ResNet, data and calibration."""
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, n=256)
    calib = self_labelled(model, n=128, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = scan(model, data, ScanConfig.defaults(METHODS), calib=calib, progress=False)
    fast = scan(model, data, ScanConfig.defaults(METHODS, fast=True, fast_measured=6), calib=calib,
                progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model is untouched
    return full, fast


def test_the_estimate_is_half_the_fisher_quadratic_form_and_matches_a_small_kl():
    # a softmax regression: for a small weight change, KL(p || p') = 1/2 d'Fd to second order
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x = torch.randn(4000, 6)
    fisher = fisher_diagonal(model, x, micro=8)
    est = ProbeEstimator(model, fisher)
    delta = 0.05 * torch.randn_like(model.weight)
    with torch.no_grad():
        logp = torch.log_softmax(model(x), 1)
        model.weight += delta
        value, se = est.estimate()
        logq = torch.log_softmax(model(x), 1)
        model.weight -= delta
    kl = float((logp.exp() * (logp - logq)).sum(1).mean())
    # the diagonal misses the off-diagonal terms: the same order, not equal
    assert 0.4 * kl < value < 2.5 * kl, (value, kl)
    assert 0 < se < value
    assert model.weight.grad is None  # no gradient was left on the user's parameters


def test_a_probe_that_changes_more_than_parameter_values_is_not_estimated():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    est = ProbeEstimator(model, fisher_diagonal(model, torch.randn(32, 4)))
    handle = model[0].register_forward_pre_hook(lambda m, a: a)  # e.g. activation quantization
    assert est.estimate() is None
    handle.remove()
    original = model[2]
    model[2] = nn.Linear(4, 3)  # a module swapped (low-rank factorization)
    assert est.estimate() is None
    model[2] = original
    model[1].running_mean += 1.0  # a buffer changed
    assert est.estimate() is None
    model[1].running_mean -= 1.0
    assert est.estimate() == (0.0, 0.0)


def test_a_parameter_no_gradient_reaches_is_measured_not_estimated_as_free():
    class Frozen(nn.Module):  # a frozen first layer: forward runs it under no_grad
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            with torch.no_grad():
                h = self.a(x)
            return self.b(h)

    model = Frozen().eval()
    est = ProbeEstimator(model, fisher_diagonal(model, torch.randn(32, 4)))
    with torch.no_grad():
        model.a.weight += 0.5  # changes the outputs, but its Fisher diagonal is 0
    assert est.estimate() is None
    with torch.no_grad():
        model.a.weight -= 0.5
        model.b.weight += 0.05
    value, _ = est.estimate()
    assert value > 0


def test_a_fast_scan_estimates_weight_probes_measures_a_few_and_ranks_like_the_full_scan(scans):
    full, fast = scans
    assert check_scan(fast.data) == []
    measured = {_key(r): r for r in full.results}
    assert measured.keys() == {_key(r) for r in fast.results}
    rows = fast.results
    estimated = [r for r in rows if r.get("estimated")]
    points = [r for r in rows if r.get("map_point")]
    assert len(points) == 6
    assert {r["method"] for r in estimated} == {"prune", "weight_quant"}
    assert all(r["drop"] is None and r["score"] is None for r in estimated)
    # activation quantization installs a hook: measured, its measured KL stands for the estimate
    for r in rows:
        if r["method"] == "act_quant":
            assert not r.get("estimated") and r["signals"]["fisher"]["measured"] == "kl"
            assert r["signals"]["fisher"]["value"] == r["signals"]["kl"]["value"]
    # a map point is measured as the full scan measures it, and keeps its estimate
    for r in points:
        assert r["drop"] == pytest.approx(measured[_key(r)]["drop"], abs=1e-9)
        assert r["signals"]["kl"]["value"] == pytest.approx(measured[_key(r)]["signals"]["kl"]["value"])
        assert "measured" not in r["signals"]["fisher"]
    # the estimate ranks the probes as the measured KL divergence and loss increase do
    for method in ("prune", "weight_quant"):
        rs = [r for r in rows if r["method"] == method]
        est = [r["signals"]["fisher"]["value"] for r in rs]
        assert spearmanr(est, [measured[_key(r)]["signals"]["kl"]["value"] for r in rs])[0] >= 0.8
        assert spearmanr(est, [measured[_key(r)]["loss_increase"] for r in rs])[0] >= 0.8
    assert fast.data["provenance"]["probes_estimated"] == len(estimated)
    assert fast.data["config"]["fast"] is True


def test_a_fast_scan_plans_on_its_estimate_and_refuses_to_add_up_drops(scans):
    _, fast = scans
    plan = make_plan(fast, [Budget.parse("size=0.3")])
    assert plan.data["objective"]["signal"] == "fisher"
    knots = plan.data["objective"]["drop_map"]["knots"]
    assert len(knots) >= 2 and knots[-1][1] > 0
    predicted = plan.data["plans"]["planned"]["predicted"]
    assert predicted["size_fraction"] <= 0.3 + 1e-9 and predicted["drop"] >= 0
    with pytest.raises(ArtifactError, match=r"estimated \(scan --fast\).*--signal fisher"):
        make_plan(fast, [Budget.parse("size=0.3")], signal="drop")
    with pytest.raises(ArtifactError, match="'kl' is not in every probe"):
        make_plan(fast, [Budget.parse("size=0.3")], signal="kl")
    # a scan with one measured probe cannot map the estimate to the drop
    data = json.loads(json.dumps(fast.data))
    kept = False
    for r in data["results"]:
        if r.get("map_point") and kept:
            r.update(drop=None, estimated=True, map_point=False)
        elif r.get("map_point"):
            kept = True
    with pytest.raises(ArtifactError, match=r"Only 1 probe\(s\).*--fast-measured"):
        make_plan(Scan(data), [Budget.parse("size=0.3")])


def test_a_full_scan_plans_on_the_kl_divergence_by_default(scans):
    full, _ = scans
    plan = make_plan(full, [Budget.parse("size=0.3")])
    assert plan.data["objective"]["signal"] == "kl"
    assert make_plan(full, [Budget.parse("size=0.3")], signal="drop").data["objective"]["drop_map"] is None


def test_fast_needs_logits_and_a_kl_signal():
    with pytest.raises(UserInputError, match="--fast-measured must be >= 2"):
        ScanConfig.defaults(["weight_quant"], fast=True, fast_measured=1)

    class Features(nn.Module):  # returns (batch, channels, h, w): no class probabilities
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    model = Features().eval()
    x = torch.randn(8, 3, 8, 8)
    with pytest.raises(UserInputError, match=r"must return \(batch, classes\) logits.*without --fast"):
        fisher_diagonal(model, x)


def test_a_fast_scan_resumes_from_its_journal_and_a_full_scan_does_not_take_its_estimates(tmp_path):
    model = seeded_model("tiny_convnet")
    data = self_labelled(model, n=64)
    cfg = ScanConfig.defaults(["weight_quant"], fast=True, fast_measured=2)
    journal = tmp_path / "scan.json.journal"
    first = scan(model, data, cfg, progress=False, journal=journal)
    again = scan(model, data, cfg, progress=False, journal=journal)
    assert again.data["provenance"]["probes_from_journal"] == len(again.results)
    assert [r.get("map_point") for r in again.results] == [r.get("map_point") for r in first.results]
    assert sum(1 for r in again.results if r.get("map_point")) == 2
    with pytest.raises((ArtifactError, UserInputError), match="journal"):
        scan(model, data, ScanConfig.defaults(["weight_quant"]), progress=False, journal=journal)


def test_the_estimator_estimates_the_same_with_the_prefix_cache_on_and_off():
    """The prefix cache keeps no copy of the weights (fingerprints of them), so the estimator keeps
    its own; the estimates equal those of a scan with the cache off."""
    estimates = []
    for mb in (64, 0):  # the cache on (its copies shared), then off
        m = seeded_model("tiny_resnet")
        table = scan(m, self_labelled(m, n=256), ScanConfig.defaults(METHODS, fast=True, fast_measured=6, cache_mb=mb),
                     calib=self_labelled(m, n=128, seed=1), progress=False)
        estimates.append({_key(r): r["signals"]["fisher"]["value"] for r in table.results if r.get("estimated")})
    assert estimates[0] and estimates[0] == estimates[1]
