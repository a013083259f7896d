"""The verdict: one line saying which allocation won, by how much, on which data and with what
uncertainty, and why the order changed where fine-tuning or the data reversed it.

Shared by the report (its first line) and ``sensplan demo`` / ``sensplan run`` (their last line).
Reads the artifacts only: the plan and the ``metrics.json`` of each applied variant. Two variants
measured on the same items (the same ``items`` digest) compare pairwise: the difference of their
per-item scores gives a paired standard error. Without per-item scores, a fraction metric falls
back to the unpaired binomial error (wider); any other metric has none, and the line says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sensplan._metric import Metric

#: a difference counts as a win beyond the noise when it exceeds this many standard errors (95%)
Z = 1.96


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


@dataclass(frozen=True)
class Verdict:
    """``line``: the one line. ``winner``: ``planned``, ``uniform``, or None (a tie within the noise,
    or nothing to compare). ``advantage``: how much less the planned allocation dropped than the
    uniform one (metric units; positive = the plan is better), with its standard error ``se``
    (``paired`` or not), over ``n`` items measured on ``measured_on``. ``notes``: reversals
    explained. ``level``: ``ok`` (the plan won), ``tie``, ``bad`` (uniform won), ``none``."""

    line: str
    winner: str | None = None
    advantage: float | None = None
    se: float | None = None
    paired: bool = False
    n: int | None = None
    measured_on: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    level: str = "none"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over the same items and its standard error (population variance / n: for
    0/1 scores, the McNemar-style error the scan uses)."""
    n = len(a)
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / n
    return mean, math.sqrt(var / n)


def _difference(metric: Metric, p: Mapping[str, Any], u: Mapping[str, Any]
                ) -> tuple[float, float | None, bool] | None:
    """(planned's advantage, its se, paired) between two measurements of the same items, or None
    when they were measured on different items."""
    if not (_num(p.get("score")) and _num(u.get("score"))):
        return None
    if p.get("n") != u.get("n") or (p.get("items") and u.get("items") and p["items"] != u["items"]):
        return None
    sign = 1.0 if metric.higher_is_better else -1.0
    adv = sign * (float(p["score"]) - float(u["score"]))
    ps, us = p.get("per_sample"), u.get("per_sample")
    n = int(p.get("n") or 0)
    if isinstance(ps, list) and isinstance(us, list) and len(ps) == len(us) == n and n > 1:
        mean, se = paired_difference(ps, us)
        if abs(sign * mean - adv) <= 1e-4 * max(1.0, abs(adv)):  # per-item scores average to the score
            return adv, se, True
    if metric.unit == "fraction" and n > 0 and all(0 <= float(x["score"]) <= 1 for x in (p, u)):
        var = sum(float(x["score"]) * (1 - float(x["score"])) for x in (p, u)) / n
        return adv, math.sqrt(var), False
    return adv, None, False


def _by(metric: Metric, adv: float, se: float | None, paired: bool) -> str:
    text = metric.format_drop(abs(adv))
    if se is not None:
        text += f" ± {metric.format_drop(se).split()[0]} ({'paired' if paired else 'unpaired'} SE)"
    return text


def _order(adv: float, se: float | None) -> str | None:
    """``planned``, ``uniform``, or None when the difference is within ``Z`` standard errors."""
    if se is not None and abs(adv) <= Z * se:
        return None
    return "planned" if adv > 0 else "uniform" if adv < 0 else None


def _uniform_name(plan: Any) -> str:
    uni = ((plan.data.get("plans") or {}).get("uniform") or {}) if plan is not None else {}
    label = (uni.get("uniform") or {}).get("label")
    return f"uniform ({label})" if label else "uniform"


def _planned_name(plan: Any) -> str:
    win = ((plan.data.get("verification") or {}).get("winner") or {}) if plan is not None else {}
    if win.get("kind") == "uniform":
        return f"planned (= {win.get('name')}: verification kept a uniform candidate)"
    return "planned"


def _same_allocation(plan: Any) -> bool:
    """Whether the planned allocation is the uniform one (verification kept it)."""
    plans = plan.data.get("plans") or {}
    p, u = plans.get("planned") or {}, plans.get("uniform") or {}
    def settings(a: Mapping[str, Any]) -> dict[str, Any]:
        return {b: (c.get("method"), c.get("label")) for b, c in (a.get("choices") or {}).items()}
    return bool(p and u) and settings(p) == settings(u)


def _verification_note(plan: Any, metric: Metric, winner: str | None, fine_tuned: bool,
                       before_ft: str | None) -> str | None:
    """Why verification's order differs from the measurement's, when it does. Verification measures
    before fine-tuning, on the split it chose on; ``before_ft`` is the order this measurement found
    before fine-tuning (when there was fine-tuning)."""
    ver = (plan.data.get("verification") or {}) if plan is not None else {}
    vs = ver.get("vs_best_uniform")
    if not vs or not _num(vs.get("advantage")) or float(vs["advantage"]) == 0:
        return None
    chose = "planned" if float(vs["advantage"]) > 0 else "uniform"
    if winner == chose or (fine_tuned and before_ft == chose):  # the same order, or fine-tuning explains it
        return None
    held = (ver.get("split") or {}).get("held_out")
    by = metric.format_drop(abs(float(vs["advantage"])))
    close = ver.get("within_noise") or {}
    if _num(close.get("se")):  # the margin was within one paired SE there: a close call
        by += f" (a close call, within one paired SE of {metric.format_drop(float(close['se']))})"
    n = f"its {held}-item held-out split" if held else "the split it chose on"
    if fine_tuned:
        return f"verification, which measures before fine-tuning, chose {chose} by {by} on {n}"
    return (f"verification chose {chose} by {by} on {n}, where the candidates were chosen (a choice flatters "
            f"what it picks); the measurement here, on data no choice touched, is the one to trust")


def verdict(plan: Any, results: Mapping[str, Mapping[str, Any]], metric: Metric | None = None) -> Verdict:
    """The verdict of a plan (a :class:`~sensplan.planner.Plan`, or None) and the ``metrics.json``
    of its applied variants (``{"planned": ..., "uniform": ...}``, either may be missing)."""
    if metric is None:
        task = (plan.data.get("task") if plan is not None else None) or next(
            (r.get("task") for r in results.values() if r.get("task")), None) or {}
        metric = Metric.from_dict({"name": "score", "unit": "fraction", **(task.get("metric") or {})})
    p, u = results.get("planned"), results.get("uniform")
    if p is not None and u is not None:
        return _compare(plan, metric, p, u)
    if p is not None:
        return _alone(plan, metric, p)
    return _from_plan(plan, metric)


def _compare(plan: Any, metric: Metric, p: Mapping[str, Any], u: Mapping[str, Any]) -> Verdict:
    pa, ua = p.get("after") or {}, u.get("after") or {}
    diff = _difference(metric, pa, ua)
    pname, uname = _planned_name(plan), _uniform_name(plan)
    where = p.get("measured_on") or "the measurement data"
    if not (_num(pa.get("score")) and _num(ua.get("score"))):
        return Verdict("Planned and uniform were applied, but "
                       + ("neither score was" if not (_num(pa.get("score")) or _num(ua.get("score"))) else
                          "one score was not") + " measured: no comparison.")
    if diff is None or (p.get("measured_on") or None) != (u.get("measured_on") or None):
        return Verdict(f"Planned and uniform were measured on different data ({where}; "
                       f"{u.get('measured_on') or '?'}): no comparison. Apply both with the same --data.")
    adv, se, paired = diff
    n = int(pa.get("n") or 0)
    if plan is not None and _same_allocation(plan):
        ver = plan.data.get("verification") or {}
        why = (f" ({ver['verdict']})" if ver.get("verdict") else "")
        return Verdict(f"The plan is the uniform allocation {uname.removeprefix('uniform ')}: verification "
                       f"found no planned allocation better beyond the noise{why}. It scores "
                       f"{_score(metric, pa.get('score'))} on {n:,} items: {where}.", "uniform", adv, se,
                       paired, n, where, (), "tie")
    winner = _order(adv, se)
    ft = " after fine-tuning" if p.get("fine_tune") or u.get("fine_tune") else ""
    scores = f"{_score(metric, pa.get('score'))} against {_score(metric, ua.get('score'))}"
    if winner == "planned":
        head, level = f"The {pname} allocation beats {uname} by {_by(metric, adv, se, paired)}", "ok"
    elif winner == "uniform":
        head, level = f"{uname[0].upper() + uname[1:]} beats the {pname} allocation by " \
                      f"{_by(metric, adv, se, paired)}", "bad"
    elif se is None:
        head, level = f"The {pname} allocation and {uname} score the same", "tie"
    else:
        lead = "the plan" if adv > 0 else "uniform"
        head, level = ((f"No winner beyond the noise: {lead} leads by {_by(metric, adv, se, paired)}, "
                        f"within {Z} SE") if adv else
                       f"No winner: the {pname} allocation and {uname} score the same"), "tie"
    notes = []
    pn, un = p.get("after_without_finetune"), u.get("after_without_finetune")
    before = _difference(metric, pn, un) if ft and pn and un else None
    was = _order(*before[:2]) if before is not None else None
    if before is not None and was != winner:
        said = (f"the plan led by {_by(metric, *before)}" if was == "planned" else
                f"uniform led by {_by(metric, *before)}" if was == "uniform" else
                f"they were within the noise ({_by(metric, *before)})")
        notes.append(f"before fine-tuning {said}: fine-tuning recovered more for "
                     f"{'uniform' if adv < before[0] else 'the plan'}, and the plan's predictions "
                     f"are of the model before fine-tuning")
    if se is None and metric.unit != "fraction":
        notes.append("no per-item scores were recorded, so the difference has no error bar")
    vnote = _verification_note(plan, metric, winner, bool(ft), was)
    if vnote:
        notes.append(vnote)
    line = f"{head}{ft} ({scores}), on {n:,} items: {where}."
    if notes:
        joined = "; ".join(notes)
        line += " " + joined[0].upper() + joined[1:] + "."
    return Verdict(line, winner, adv, se, paired, n, where, tuple(notes), level)


def _score(metric: Metric, x: Any) -> str:
    return metric.format_score(float(x)) if _num(x) else "–"


def _alone(plan: Any, metric: Metric, p: Mapping[str, Any]) -> Verdict:
    b, a = p.get("before") or {}, p.get("after") or {}
    if not (_num(b.get("score")) and _num(a.get("score"))):
        return Verdict("The planned allocation was applied, but its score was not measured.")
    diff = _difference(metric, a, b)  # the drop is the original's advantage over the compressed
    drop = -diff[0] if diff else metric.drop(float(b["score"]), float(a["score"]))
    se = diff[1] if diff else None
    kind = "paired" if diff and diff[2] else "unpaired"
    text = metric.format_drop(drop) + (f" ± {metric.format_drop(se).split()[0]} ({kind} SE)" if se else "")
    reason = ("no uniform allocation meets the budget" if plan is not None and
              (plan.data.get("plans") or {}).get("uniform") is None else
              "the uniform allocation was not applied (apply --variant both)")
    return Verdict(f"The {_planned_name(plan)} allocation drops {text} from the original "
                   f"({_score(metric, b['score'])} to {_score(metric, a['score'])}), on "
                   f"{int(a.get('n') or 0):,} items: {p.get('measured_on') or 'the measurement data'}. "
                   f"No comparison with uniform: {reason}.", "planned", None, None, False,
                   int(a.get("n") or 0), p.get("measured_on"), (), "none")


def _from_plan(plan: Any, metric: Metric) -> Verdict:
    if plan is None:
        return Verdict("No plan: the scan alone says which units are sensitive, not which allocation wins.")
    ver = plan.data.get("verification") or {}
    planned = (plan.data.get("plans") or {}).get("planned") or {}
    exp = planned.get("expected") or {}
    if not ver:
        pred = planned.get("predicted") or {}
        return Verdict(f"Predicted only (the plan was not verified and not applied): the planned allocation "
                       f"drops {metric.format_drop(float(pred.get('drop') or 0.0))}. Run sensplan apply "
                       f"to measure it.")
    line = str(ver.get("verdict") or "").strip()
    if line and not line.endswith("."):
        line += "."
    if _num(exp.get("drop")):
        line += (f" Expected drop {metric.format_drop(float(exp['drop']))}"
                 + (f" ± {metric.format_drop(float(exp['drop_se'])).split()[0]}" if _num(exp.get("drop_se")) else "")
                 + f", measured on the {exp.get('measured_on', '?')}. Not applied yet.")
    winner = (ver.get("winner") or {}).get("kind")
    return Verdict(line.strip(), "planned" if winner == "plan" else "uniform" if winner else None,
                   level="ok" if winner == "plan" else "tie" if winner else "none")


def verdict_of(plan: Any, result: Any) -> Verdict:
    """:func:`verdict` of a plan (a ``Plan``, a plan.json path, or None) and an apply output
    directory (or one metrics.json; None: the plan alone)."""
    from sensplan.planner import Plan
    from sensplan.reports._render import _load_results

    p = plan if isinstance(plan, Plan) or plan is None else Plan.load(plan)
    return verdict(p, _load_results(result)[0])


def verdict_line(plan: Any, result: Any) -> str:
    """The verdict's one line (:func:`verdict_of`), for a command's printed summary."""
    return verdict_of(plan, result).line
