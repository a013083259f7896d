"""Tasks: the labelled ``classification`` task against the label-free ``agreement`` task."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from sensplan import UserInputError
from sensplan.planner import Budget, Plan, apply_plan, load_metrics, make_plan
from sensplan.sensitivity import TASKS, EvalSet, ModelSpec, ScanConfig, get_task, scan
from tests.conftest import seeded_model, self_labelled

SPEC = ModelSpec("sensplan:tiny_resnet")
SETTINGS = {"prune": [{"ratio": 0.25}, {"ratio": 0.5}],
            "weight_quant": [{"bits": 4}, {"bits": 3}, {"bits": 2}],
            "half": [{"dtype": "bfloat16"}]}


def relabelled(data: EvalSet, y: torch.Tensor, what: str) -> EvalSet:
    return EvalSet(data.x, y, data.classes, {**data.description, "labels": what}, data.indices)


def noisy_labels(data: EvalSet, fraction: float = 0.3, seed: int = 1) -> EvalSet:
    """The model's own predictions with a seeded ``fraction`` moved to the next class: a labelled
    set on which the model is 71% right, so top-1 and agreement differ but must still correlate."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(data.y), generator=g) < fraction
    return relabelled(data, torch.where(flip, (data.y + 1) % len(data.classes), data.y), "noisy")


@pytest.fixture(scope="module")
def setup():
    model = seeded_model("tiny_resnet")
    clean = self_labelled(model, 128)
    calib = self_labelled(model, 48, seed=9)
    data = noisy_labels(clean)
    labelled = scan(model, data, ScanConfig(SETTINGS), calib=calib, model_spec=SPEC,
                    progress=False)
    agreement = scan(model, data, ScanConfig(SETTINGS, task="agreement"), calib=calib,
                     model_spec=SPEC, progress=False)
    return model, clean, data, calib, labelled, agreement


def by_probe(table) -> dict[tuple[str, str], dict]:
    return {(r["unit"], r["label"]): r for r in table.results}


def test_both_tasks_are_registered():
    # the built-in tasks register on the first get_task (TASKS is empty before it)
    assert get_task("agreement").needs_labels is False
    assert get_task("classification").needs_labels is True
    assert {"classification", "agreement"} <= set(TASKS.names())


def test_agreement_baseline_is_perfect_agreement_with_zero_divergence(setup):
    _, _, _, _, labelled, agreement = setup
    assert agreement.baseline["score"] == 1.0
    assert agreement.baseline["loss"] == pytest.approx(0.0, abs=1e-12)
    assert agreement.baseline["n"] == 128
    # the labelled task sees the noisy labels: 30% of them disagree with the model
    assert 0.6 < labelled.baseline["score"] < 0.8


def test_agreement_of_a_model_with_nearly_equal_logits_with_itself_is_perfect():
    """Logits near 0 (a random-init model's): log_softmax rounds them to ties, whose argmax is
    class 0; the reference's top class comes from the logits themselves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10)).eval()
    with torch.no_grad():
        model[1].weight.mul_(1e-9)
        model[1].bias.zero_()
    x = torch.randn(64, 3, 2, 2)
    data = EvalSet(x, torch.full((64,), -1), [str(i) for i in range(10)], {"source": "test"})
    task = get_task("agreement")
    with torch.no_grad():
        assert len(set(model(x).argmax(1).tolist())) > 1  # the logits still tell the classes apart
    res = task.evaluate(model, data, task.prepare(model, data))
    assert res.score == 1.0


def test_agreement_drops_are_never_negative_and_grow_under_destructive_probes(setup):
    _, _, _, _, _, agreement = setup
    for r in agreement.results:
        assert r["drop"] == pytest.approx(1.0 - r["score"])
        assert r["drop"] >= 0.0, r["label"]
        assert r["loss_increase"] >= -1e-9, r["label"]  # a KL divergence
        assert r["gained"] == 0  # nothing agrees more than the original itself
    pruned = [r for r in agreement.results if r["method"] == "prune"]
    assert pruned and all(r["drop"] > 0 for r in pruned)
    for unit in {r["unit"] for r in agreement.results}:
        bits = {r["setting"]["bits"]: r for r in agreement.results
                if r["unit"] == unit and r["method"] == "weight_quant"}
        assert bits[2]["loss_increase"] > bits[4]["loss_increase"], unit


def test_agreement_ranks_units_like_the_labelled_task(setup):
    _, _, _, _, labelled, agreement = setup
    a, b = by_probe(labelled), by_probe(agreement)
    assert a.keys() == b.keys()
    keys = sorted(a)
    rho = spearmanr([a[k]["drop"] for k in keys], [b[k]["drop"] for k in keys]).statistic
    assert rho > 0.8, rho  # 0.93 on this model and data


def test_on_self_labelled_data_agreement_is_top1(setup):
    """When the labels are the model's own predictions, agreement and top-1 are the same number."""
    model, clean, _, calib, _, _ = setup
    cfg = {"prune": [{"ratio": 0.5}], "weight_quant": [{"bits": 2}]}
    top1 = scan(model, clean, ScanConfig(cfg), calib=calib, progress=False)
    agree = scan(model, clean, ScanConfig(cfg, task="agreement"), calib=calib, progress=False)
    for k, r in by_probe(top1).items():
        assert by_probe(agree)[k]["score"] == r["score"], k


def test_agreement_needs_no_labels(setup):
    model, _, data, calib, _, agreement = setup
    unlabelled = relabelled(data, torch.full_like(data.y, -1), "none")
    table = scan(model, unlabelled, ScanConfig(SETTINGS, task="agreement"), calib=calib,
                 model_spec=SPEC, progress=False)
    assert table.baseline == agreement.baseline
    assert [(r["unit"], r["label"], r["score"], r["loss"]) for r in table.results] == \
        [(r["unit"], r["label"], r["score"], r["loss"]) for r in agreement.results]


def test_classification_without_labels_points_to_the_agreement_task(setup):
    model, _, data, _, _, _ = setup
    unlabelled = relabelled(data, torch.full_like(data.y, -1), "none")
    with pytest.raises(UserInputError, match="--task agreement"):
        scan(model, unlabelled, ScanConfig(SETTINGS), progress=False)


def test_a_model_at_chance_level_is_refused_before_any_probe_and_agreement_still_scans_it(setup):
    """Labels the model gets right only by chance (a seeded shuffle of its own answers): the
    labelled scan stops with one message naming the fix, and scans nothing; agreement, which
    compares with the model's own answers, is unaffected. Data the model beats chance on passes."""
    model, clean, data, calib, _, agreement = setup
    g = torch.Generator().manual_seed(3)
    shuffled = relabelled(clean, clean.y[torch.randperm(len(clean.y), generator=g)], "shuffled")
    top = float(torch.bincount(shuffled.y).max()) / len(shuffled.y)
    with pytest.raises(UserInputError, match=r"of always answering the most common class "
                                             rf"\({top:.3f} of 128 samples\).*--weights.*--task agreement"):
        scan(model, shuffled, ScanConfig(SETTINGS), calib=calib, model_spec=SPEC, progress=False)
    again = scan(model, shuffled, ScanConfig(SETTINGS, task="agreement"), calib=calib, model_spec=SPEC,
                 progress=False)
    assert again.baseline["score"] == 1.0 and len(again.results) == len(agreement.results)
    task = get_task("classification")
    base = task.evaluate(model, data, task.prepare(model, data))
    assert 0.6 < base.score < 0.8 and task.check_baseline(base, data) is None  # noisy labels: 71% right


def test_the_chance_check_passes_a_real_model_on_imbalanced_labels_and_skips_what_it_cannot_judge():
    from sensplan.sensitivity.tasks import TaskResult

    task = get_task("classification")
    y = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)])  # 90/10

    def data(labels: torch.Tensor, kind: str = "imagefolder") -> EvalSet:
        return EvalSet(torch.zeros(len(labels), 1), labels, ["a", "b"], {"kind": kind})

    def result(score: float, n: int = 1000) -> TaskResult:
        return TaskResult(score, 0.0, n)

    assert task.check_baseline(result(0.92), data(y)) is None  # above 0.90 by more than its 0.0095 SE
    refused = task.check_baseline(result(0.905), data(y))
    assert "within one standard error (0.009) of always answering the most common class (0.900 of 1000" in refused
    assert "--mean/--std" in refused
    assert "the label field" in task.check_baseline(result(0.905), data(y, "jsonl"))  # text: no --mean/--std
    assert task.check_baseline(result(0.0), data(y[:49])) is None  # too few to tell
    assert task.check_baseline(result(0.0), data(torch.zeros(100, dtype=torch.long))) is None  # one class
    assert task.check_baseline(result(0.0), data(torch.full((100,), -1))) is None  # no labels
    assert task.check_baseline(result(0.0), data(torch.zeros(100, 2))) is None  # not class indices


def test_an_unknown_task_suggests_the_closest():
    with pytest.raises(UserInputError, match="Did you mean 'agreement'") as e:
        ScanConfig({"weight_quant": [{"bits": 4}]}, task="agreemnt")
    assert "classification" in str(e.value) and "--task" in str(e.value)


def test_the_task_and_its_metric_travel_through_scan_plan_and_metrics(tmp_path, setup):
    model, _, data, calib, labelled, agreement = setup
    assert labelled.data["task"]["name"] == "classification" and labelled.metric.name == "top1"
    assert agreement.data["task"]["name"] == "agreement"
    assert agreement.metric.name == "agreement" and agreement.metric.higher_is_better
    table = agreement.save(tmp_path / "scan.json")
    make_plan(table, [Budget.parse("size=0.5")]).save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.data["task"] == agreement.data["task"]
    assert loaded.metric.name == "agreement"
    predicted = loaded.variant()["predicted"]
    assert predicted["score"] == pytest.approx(1.0 - predicted["drop"])
    unlabelled = relabelled(data, torch.full_like(data.y, -1), "none")
    metrics = apply_plan(model, loaded, unlabelled, tmp_path / "out", calib=calib, model_spec=SPEC,
                         timing=False)
    stored = load_metrics(tmp_path / "out")
    assert stored["task"]["name"] == "agreement"
    assert stored["task"]["metric"]["name"] == "agreement"
    assert metrics["before"]["score"] == 1.0 and metrics["before"]["loss"] == pytest.approx(0.0)
    assert 0.0 <= metrics["after"]["score"] <= 1.0


@pytest.mark.parametrize("name", ["classification", "agreement"])
def test_a_tasks_baseline_is_its_prepare_and_evaluate_on_the_original(setup, name):
    """`baseline` gives what prepare + evaluate give (classification takes both from one forward
    pass), to the bit: verification's drops and paired errors are measured against it."""
    model, _, data, _, _, _ = setup
    task = get_task(name)
    state, base = task.baseline(model, data, 50)
    ref = task.prepare(model, data, 50)
    again = task.evaluate(model, data, ref, 50)
    def tensors(s):  # a tensor, or a tuple of them (agreement: the log-probabilities and top classes)
        return (s,) if isinstance(s, torch.Tensor) else tuple(s)

    assert all(torch.equal(a, b) for a, b in zip(tensors(state), tensors(ref), strict=True))
    assert torch.equal(base.per_sample, again.per_sample)
    assert (base.score, base.loss, base.n) == (again.score, again.loss, again.n)
    assert base.signals.keys() == again.signals.keys()
    assert all(torch.equal(base.signals[k], again.signals[k]) for k in base.signals)
