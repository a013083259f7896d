"""``sensplan demo``: train a small CNN on scikit-learn's digits, then run the whole pipeline.

The digits are small (540 test images), so the demo's choices are made for the measurement to mean
something: the scan samples 200 test images, the held-out rest (340) is halved into the split that
verification chooses on and the split that only measures (170 images no choice touched); the budget
(a quarter of the MACs) is tight enough that uniform pruning removes half of every layer's channels;
fine-tuning runs until its training loss levels off (10 epochs, a few seconds); latency is timed at
batch 256, where the arithmetic and not the per-call overhead sets the time. The printed summary
ends with the verdict (:func:`sensplan.reports.verdict_line`) and the report's path.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sensplan.cli._common import (
    EXIT_BUDGET_MISSED,
    Output,
    Problems,
    add_verb,
    check_outputs,
    default_threads,
)

if TYPE_CHECKING:
    from sensplan.cli._common import SubParsers

EXAMPLE = """\
  sensplan demo        # trains a small CNN on scikit-learn's digits, then scan/plan/apply/report
  sensplan demo --out /tmp/demo --budget size=0.25
"""

#: the demo's budget: a quarter of the MACs, where uniform pruning removes half of every layer's channels
DEMO_BUDGET = "macs=0.25"
#: fine-tuning epochs: on the digits the distillation loss levels off by about epoch 8
DEMO_EPOCHS = 10
#: scan sample of digits:test (540 images); the other 340 are the held-out split, halved
DEMO_SAMPLES = 200
#: latency batch: at batch 1 a model this small is timed by its per-call overhead, not its arithmetic
DEMO_LATENCY_BATCH = 256


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "demo", "Offline demo: train a small CNN on scikit-learn's digits, then run "
                              "the whole pipeline.", EXAMPLE)
    p.add_argument("--out", default="sensplan-demo", metavar="DIR",
                   help="output directory (default sensplan-demo/)")
    p.add_argument("--budget", action="append", default=[], metavar="METRIC=VALUE",
                   help=f"default {DEMO_BUDGET} (repeatable)")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS,
                   help=f"fine-tuning epochs after compression (default {DEMO_EPOCHS})")
    p.add_argument("--seed", type=int, default=0, help="seed of training and sampling (default 0)")
    p.add_argument("--threads", type=int, metavar="N",
                   help=f"CPU threads for torch (default: min(4, available cores) = "
                        f"{default_threads()} here)")
    p.add_argument("--no-timing", action="store_true", help="skip the latency measurement")
    p.set_defaults(fn=main)


def demo_argv(out: str | Path, weights: str | Path, budgets: Sequence[str] = (DEMO_BUDGET,),
              epochs: int = DEMO_EPOCHS, seed: int = 0, timing: bool = True,
              threads: int | None = None) -> list[str]:
    """The ``sensplan run`` command line of the demo's pipeline."""
    from sensplan.planner._demo import DEMO_MODEL

    argv = ["run", "--model", DEMO_MODEL, "--weights", str(weights), "--data", "digits:test",
            "--samples", str(DEMO_SAMPLES), "--train-data", "digits:train", "--epochs", str(epochs),
            "--calib-samples", "500", "--seed", str(seed), "--latency-batch", str(DEMO_LATENCY_BATCH),
            "--out", str(out), "--no-verdict"]
    for b in budgets:
        argv += ["--budget", b]
    if not timing:
        argv.append("--no-timing")
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv


def check_pipeline(argv: list[str], problems: Problems) -> None:
    """Every check ``sensplan run`` makes of ``argv`` (budgets, output paths), without running it:
    a bad --budget or --out must not cost the training first."""
    from sensplan.cli import apply, build_parser, plan, report, scan

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    scan.check(args, problems)
    plan.check(args, problems)
    variants = apply.check_variants(args, problems)
    apply.check_finetune(args, problems)
    check_outputs(problems, [Output(out, "--out", is_dir=True), Output(out / "digits_cnn.pt", "--out"),
                             *scan.scan_outputs(out / "scan.json"), Output(out / "plan.json", "--out"),
                             *apply.result_outputs(out / "result", variants),
                             *report.report_outputs(out / "report")])


def main(args: argparse.Namespace) -> int:
    from sensplan.cli import main as sensplan
    from sensplan.planner import Budget
    from sensplan.planner._demo import train_demo_model

    problems = Problems()
    problems.at_least(args.epochs, 0, "--epochs")
    problems.at_least(args.threads, 1, "--threads")
    problems.at_least(args.seed, 0, "--seed")
    budgets = args.budget or [DEMO_BUDGET]
    for b in budgets:
        problems.check(partial(Budget.parse, b))
    out = Path(args.out)
    if not problems.messages:  # the pipeline's own checks, before the training
        check_pipeline(demo_argv(out, out / "digits_cnn.pt", budgets, args.epochs, args.seed,
                                 not args.no_timing, args.threads), problems)
    else:
        check_outputs(problems, [Output(out, "--out", is_dir=True)])
    problems.raise_if_any()
    weights = train_demo_model(args.out, args.seed, args.threads or default_threads())
    argv = demo_argv(args.out, weights, budgets, args.epochs, args.seed, not args.no_timing,
                     args.threads)
    # the pipeline is `sensplan run`: its exit code (2, 3, 130) is the demo's. Its stdout (the
    # output directory) is left out: the demo's stdout is its summary.
    with contextlib.redirect_stdout(io.StringIO()):
        code = sensplan(["--verbose", *argv] if args.verbose else argv)
    if code in (0, EXIT_BUDGET_MISSED):
        print("\n".join(summary_lines(out)))
    return code


def summary_lines(out: str | Path) -> list[str]:
    """The demo's printed summary of a ``sensplan run`` directory: each applied variant's score
    (before and after fine-tuning), costs and latency, then the verdict and the report's path."""
    from sensplan.reports import verdict_line

    out = Path(out)
    lines = []
    results = {}
    for variant, path in (("planned", out / "result" / "metrics.json"),
                          ("uniform", out / "result" / "uniform" / "metrics.json")):
        if path.is_file():
            results[variant] = json.loads(path.read_text())
            lines += variant_lines(variant, results[variant])
    big = next((b for b in map(overhead_bound, results.values()) if b), None)
    if big:
        lines.append(f"note: at batch 1 a model this small is timed by its per-call overhead (Python, kernel "
                     f"dispatch), not its arithmetic: batch {big} shows what pruning saves")
    if "planned" in results and "uniform" in results:
        lines += slower_than_uniform(results["planned"], results["uniform"])
    lines.append(f"verdict: {verdict_line(out / 'plan.json', out / 'result')}")
    lines.append(f"report: {out / 'report' / 'report.html'}")
    return lines


def variant_lines(variant: str, m: Mapping[str, Any]) -> list[str]:
    """One variant's summary: its score before and after, its costs as fractions of the original,
    and its latency against the original's, timed interleaved (with the timing's warning)."""
    from sensplan._metric import Metric

    metric = Metric.from_dict({"name": "score", "unit": "fraction", **((m.get("task") or {}).get("metric") or {})})
    name = metric.name

    def score(x: Any) -> str:
        return metric.format_score(float(x)) if isinstance(x, (int, float)) else "-"

    before, after = m.get("before") or {}, m.get("after") or {}
    raw = m.get("after_without_finetune")
    text = (f"{variant}: {name} {score(before.get('score'))} -> {score(after.get('score'))}"
            + (f" ({score(raw.get('score'))} before fine-tuning)" if raw else "")
            + f" on {after.get('n', '?')} items")
    costs = [f"{k} {after[k] / before[k]:.3f}" for k in ("macs", "payload_bytes") if before.get(k) and k in after]
    if costs:
        text += ", " + " and ".join(costs).replace("payload_bytes", "size") + " of the original"
    lines = [text]
    timing = m.get("timing") or {}
    speed = {b: (float(t["original"]["p50_ms"]), float(t["compressed"]["p50_ms"]))
             for b, t in (timing.get("batches") or {}).items()}
    if speed:
        lines.append("  latency p50, original -> compressed, timed interleaved: " + "; ".join(
            f"batch {b} {o:.3g} -> {c:.3g} ms ({speed_word(o, c)})" for b, (o, c) in speed.items()))
        if timing.get("warning"):
            lines.append(f"  timing warning: {timing['warning']}")
    return lines


def speedups(m: Mapping[str, Any]) -> dict[str, float]:
    """Per timed batch (as metrics.json names it, smallest first), the original's p50 over the
    compressed model's, both timed interleaved."""
    batches = (m.get("timing") or {}).get("batches") or {}
    return {b: float(batches[b]["original"]["p50_ms"]) / float(batches[b]["compressed"]["p50_ms"])
            for b in sorted(batches, key=int)}


def overhead_bound(m: Mapping[str, Any]) -> str | None:
    """The largest timed batch when the compressed model's speed-up over the original at batch 1 is
    less than half of that at the largest batch (the per-call overhead hides the saved arithmetic),
    else None."""
    sp = speedups(m)
    big = next(reversed(sp), None)
    if "1" not in sp or big in (None, "1"):
        return None
    s1, sb = sp["1"], sp[big]
    return big if sb > 1.2 and s1 - 1 < (sb - 1) / 2 else None


def slower_than_uniform(planned: Mapping[str, Any], uniform: Mapping[str, Any]) -> list[str]:
    """A line when the planned model gains clearly less speed over the original than the uniform one
    at the largest timed batch (each is timed interleaved with the original, so their speed-ups
    compare even when the load changed between them): a MACs or size budget counts arithmetic or
    bytes, not time."""
    sp, su = speedups(planned), speedups(uniform)
    b = next(reversed(sp), None)
    if b is None or b != next(reversed(su), None) or sp[b] >= 0.9 * su[b]:
        return []
    return [f"note: the planned model is {sp[b]:.2f}x faster than the original at batch {b}, the uniform one "
            f"{su[b]:.2f}x: the budget counts arithmetic, not time, and layers differ in time per MAC. "
            f"To budget time itself, see `sensplan profile` (README: Faster for real)"]


def speed_word(original: float, compressed: float) -> str:
    """``1.8x faster``, ``1.2x slower`` or ``the same`` (within 5%)."""
    r = original / compressed if compressed > 0 else float("inf")
    if abs(r - 1) <= 0.05:
        return "the same"
    return f"{r:.2f}x faster" if r > 1 else f"{1 / r:.2f}x slower"
