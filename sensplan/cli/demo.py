"""``sensplan demo``: train a small CNN on scikit-learn's digits, then run the whole pipeline."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

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


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "demo", "Offline demo: train a small CNN on scikit-learn's digits, then run "
                              "the whole pipeline.", EXAMPLE)
    p.add_argument("--out", default="sensplan-demo", metavar="DIR",
                   help="output directory (default sensplan-demo/)")
    p.add_argument("--budget", action="append", default=[], metavar="METRIC=VALUE",
                   help="default macs=0.5 (repeatable)")
    p.add_argument("--epochs", type=int, default=2,
                   help="fine-tuning epochs after compression (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and sampling (default 0)")
    p.add_argument("--threads", type=int, metavar="N",
                   help=f"CPU threads for torch (default: min(4, available cores) = "
                        f"{default_threads()} here)")
    p.add_argument("--no-timing", action="store_true", help="skip the latency measurement")
    p.set_defaults(fn=main)


def demo_argv(out: str | Path, weights: str | Path, budgets: Sequence[str] = ("macs=0.5",),
              epochs: int = 2, seed: int = 0, timing: bool = True,
              threads: int | None = None) -> list[str]:
    """The ``sensplan run`` command line of the demo's pipeline."""
    from sensplan.planner._demo import DEMO_MODEL

    argv = ["run", "--model", DEMO_MODEL, "--weights", str(weights), "--data", "digits:test",
            "--samples", "300", "--train-data", "digits:train", "--epochs", str(epochs),
            "--calib-samples", "500", "--seed", str(seed), "--out", str(out)]
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
    budgets = args.budget or ["macs=0.5"]
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
    # the pipeline is `sensplan run`: its exit code (2, 3, 130) is the demo's
    code = sensplan(["--verbose", *argv] if args.verbose else argv)
    if code in (0, EXIT_BUDGET_MISSED):
        print(f"report: {Path(args.out) / 'report' / 'report.html'}")
    return code
