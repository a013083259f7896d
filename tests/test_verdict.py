"""The verdict line: who won, by how much, on which data, with what uncertainty, and why an order
reversed. Checked on metrics built from known per-item scores, so every number is computable."""

from __future__ import annotations

import math

from sensplan._metric import Metric
from sensplan.planner import Plan
from sensplan.reports import verdict
from sensplan.reports._verdict import paired_difference

TOP1 = Metric("top1", True, "fraction")


def _m(per: list[float], *, items: str = "abc", before: list[float] | None = None,
       no_ft: list[float] | None = None, where: str = "the report half of the held-out split") -> dict:
    def rec(p: list[float]) -> dict:
        return {"score": sum(p) / len(p), "n": len(p), "per_sample": p, "items": items}
    out = {"after": rec(per), "before": rec(before or [1.0] * len(per)), "measured_on": where,
           "task": {"name": "classification", "metric": {"name": "top1", "higher_is_better": True,
                                                         "unit": "fraction"}}}
    if no_ft is not None:
        out["after_without_finetune"] = rec(no_ft)
        out["fine_tune"] = {"history": [{"epoch": 1}]}
    return out


def test_paired_difference_is_the_mcnemar_error_for_hits():
    a = [1.0] * 80 + [0.0] * 20
    b = [1.0] * 70 + [0.0] * 10 + [1.0] * 5 + [0.0] * 15
    mean, se = paired_difference(a, b)
    only_a, only_b, n = 10, 5, 100  # items only a gets right, only b gets right
    assert math.isclose(mean, (only_a - only_b) / n)
    lost, gained = only_a, only_b
    assert math.isclose(se, math.sqrt(lost + gained - (lost - gained) ** 2 / n) / n)


def test_a_win_beyond_the_noise_names_the_winner_margin_error_and_data():
    planned = [1.0] * 900 + [0.0] * 100
    uniform = [1.0] * 800 + [0.0] * 200  # the plan is right on every item uniform gets right, and 100 more
    v = verdict(None, {"planned": _m(planned), "uniform": _m(uniform)}, TOP1)
    assert v.winner == "planned" and v.level == "ok" and v.paired and v.n == 1000
    assert math.isclose(v.advantage, 0.1)
    assert math.isclose(v.se, math.sqrt(100 - 100 ** 2 / 1000) / 1000)
    assert "beats uniform by 10.00 pt ± 0.95 (paired SE)" in v.line
    assert "90.00% against 80.00%" in v.line and "on 1,000 items: the report half" in v.line


def test_a_small_difference_is_a_tie_and_lower_is_better_metrics_flip():
    planned = [1.0] * 96 + [0.0] * 4
    uniform = [1.0] * 95 + [0.0] * 5
    v = verdict(None, {"planned": _m(planned), "uniform": _m(uniform)}, TOP1)
    assert v.winner is None and v.level == "tie" and "No winner beyond the noise" in v.line
    # perplexity-like: lower is better, so the smaller per-item loss wins
    nats = Metric("nll", False, "nats")
    p = [1.0 + 0.001 * (i % 3) for i in range(200)]
    u = [x + 0.5 for x in p]
    v = verdict(None, {"planned": _m(p), "uniform": _m(u)}, nats)
    assert v.winner == "planned" and math.isclose(v.advantage, 0.5) and v.se < 1e-9


def test_uniform_winning_is_said_and_fine_tuning_reversals_are_explained():
    planned = [1.0] * 80 + [0.0] * 20
    uniform = [1.0] * 95 + [0.0] * 5
    v = verdict(None, {"planned": _m(planned, no_ft=[1.0] * 70 + [0.0] * 30),
                       "uniform": _m(uniform, no_ft=[1.0] * 40 + [0.0] * 60)}, TOP1)
    assert v.winner == "uniform" and v.level == "bad" and v.line.startswith("Uniform beats")
    assert any("before fine-tuning the plan led by 30.00 pt" in n for n in v.notes)
    assert "fine-tuning recovered more for uniform" in v.line


def test_different_items_are_not_compared_and_one_variant_reports_its_drop():
    v = verdict(None, {"planned": _m([1.0, 0.0]), "uniform": _m([1.0, 1.0], items="xyz")}, TOP1)
    assert v.winner is None and "different data" in v.line
    v = verdict(None, {"planned": _m([1.0] * 90 + [0.0] * 10)}, TOP1)
    assert "drops 10.00 pt" in v.line and "(paired SE)" in v.line and "No comparison with uniform" in v.line


def test_without_per_item_scores_a_fraction_falls_back_to_the_unpaired_error():
    p, u = _m([1.0] * 90 + [0.0] * 10), _m([1.0] * 70 + [0.0] * 30)
    for m in (p, u):
        del m["after"]["per_sample"]
    v = verdict(None, {"planned": p, "uniform": u}, TOP1)
    assert not v.paired and math.isclose(v.se, math.sqrt((0.9 * 0.1 + 0.7 * 0.3) / 100))
    assert "(unpaired SE)" in v.line


def test_a_plan_that_is_the_uniform_allocation_says_so():
    choices = {"channels:a": {"unit": "a", "axis": "channels", "method": "prune", "label": "prune 30%"}}
    plan = Plan({"plans": {"planned": {"choices": choices}, "uniform": {"choices": choices,
                                                                      "uniform": {"label": "prune 30%"}}},
                 "verification": {"verdict": "uniform kept", "winner": {"kind": "uniform", "name": "uniform x"}}})
    same = [1.0] * 50
    v = verdict(plan, {"planned": _m(same), "uniform": _m(same)}, TOP1)
    assert v.line.startswith("The plan is the uniform allocation (prune 30%)") and v.level == "tie"


def test_a_missing_score_or_other_data_is_named_and_the_error_bar_says_what_it_is():
    p, u = _m([1.0] * 90 + [0.0] * 10), _m([1.0] * 80 + [0.0] * 20)
    u["after"]["score"] = None
    assert "one score was not measured" in verdict(None, {"planned": p, "uniform": u}, TOP1).line
    # the same item count and digest, but measured on other data: not compared item by item
    p, u = _m([1.0] * 90 + [0.0] * 10), _m([1.0] * 80 + [0.0] * 20, where="--data other: out of sample")
    assert "different data" in verdict(None, {"planned": p, "uniform": u}, TOP1).line
    # without per-item scores, the drop from the original carries the unpaired error, named so
    alone = _m([1.0] * 80 + [0.0] * 20)
    for rec in (alone["after"], alone["before"]):
        del rec["per_sample"]
    assert "± 4.00 (unpaired SE)" in verdict(None, {"planned": alone}, TOP1).line


def test_a_verified_plan_not_yet_applied_gives_verifications_verdict_and_what_to_expect():
    plan = Plan({"plans": {"planned": {"choices": {}, "expected": {
        "drop": 0.0282, "drop_se": 0.0035, "measured_on": "report split (no choice touched it)"}}},
        "verification": {"verdict": "plan round 1 wins: 1.0 pt better than uniform", "winner": {"kind": "plan"}}})
    v = verdict(plan, {}, TOP1)
    assert v.line == ("plan round 1 wins: 1.0 pt better than uniform. Expected drop 2.82 pt ± 0.35, measured on "
                      "the report split (no choice touched it). Not applied yet.")
    assert v.winner == "planned" and v.level == "ok"


def test_a_close_call_that_the_measurement_reverses_is_said_to_have_been_close():
    """Verification keeps the least measured drop even within one paired SE (a close call); when
    the measurement on untouched data then reverses the order, the note says the call was close."""
    plan = Plan({"plans": {"planned": {"choices": {"a": {"method": "m", "label": "x"}}},
                           "uniform": {"choices": {"a": {"method": "m", "label": "y"}}}},
                 "verification": {"winner": {"kind": "plan"}, "split": {"held_out": 1250},
                                  "vs_best_uniform": {"advantage": 0.002},
                                  "within_noise": {"winner": "plan", "runner_up": "uniform y",
                                                   "advantage": 0.002, "se": 0.004}}})
    v = verdict(plan, {"planned": _m([1.0] * 80 + [0.0] * 20), "uniform": _m([1.0] * 95 + [0.0] * 5)}, TOP1)
    assert v.winner == "uniform"
    assert any("verification chose planned by 0.20 pt (a close call, within one paired SE of 0.40 pt) "
               "on its 1250-item held-out split" in n for n in v.notes), v.notes
