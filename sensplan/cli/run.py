"""``sensplan run``: scan + plan + apply + report into one directory.

Every flag, budget, cost table, method setting and output path is checked before the scan starts,
and all problems are reported together: a typo must not cost a scan.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sensplan._errors import UserInputError
from sensplan.cli import apply, plan, report, scan
from sensplan.cli._common import (
    Output,
    Problems,
    add_data_args,
    add_model_args,
    add_runtime_args,
    add_verb,
    check_outputs,
    data_spec,
    load_data,
    load_model,
    need,
    say,
    set_threads,
)

if TYPE_CHECKING:
    from sensplan.cli._common import SubParsers

EXAMPLE = """\
  sensplan run --model examples/cifar_resnet.py:resnet20 \\
      --weights ../shared/models/cifar10/resnet20_jpeg.pt \\
      --data ../shared/data/cifar10-jpg/test --budget macs=0.5 --out runs/r20
  # writes runs/r20/scan.json, plan.json, result/, report/report.html
"""


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "run", "scan + plan + apply + report in one go, into one directory.",
                 EXAMPLE)
    add_model_args(p)
    add_data_args(p)
    scan.add_scan_args(p)
    plan.add_budget_args(p)
    plan.add_verify_args(p)
    apply.add_apply_args(p)
    add_runtime_args(p, dtype=True)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: scan.json, plan.json, result/, report/")
    # `sensplan demo` prints the verdict in its own summary: not twice
    p.add_argument("--no-verdict", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
    from sensplan.reports import render_report, verdict_line

    out = Path(args.out)
    scan_out, plan_out, result_out, report_out = (out / "scan.json", out / "plan.json",
                                                  out / "result", out / "report")
    problems = Problems()
    cfg = scan.check(args, problems)
    inputs = plan.check(args, problems)
    plan.check_verify(args, problems)
    holdout = (problems.check(partial(data_spec, args.holdout_data, args, "--holdout-data"))
               if args.holdout_data and not args.no_verify else None)
    variants = apply.check_variants(args, problems)
    ft = apply.check_finetune(args, problems)
    apply.check_execution(args, problems)
    check_outputs(problems, [Output(out, "--out", is_dir=True), *scan.scan_outputs(scan_out), Output(plan_out, "--out"),
                             *apply.result_outputs(result_out, variants, runtime=args.runtime),
                             *report.report_outputs(report_out)])
    problems.raise_if_any()

    t0 = time.perf_counter()
    set_threads(args)
    model, spec = load_model(args)
    check_tie_modules(model, args.tie)  # before the scan: a tie that matches nothing fails now
    loader = apply.train_loader(args, ft)  # opens the training data: a bad one fails now
    data, calib = load_data(args)
    say("== scan ==")
    table = scan.execute(args, need(cfg), model, spec, data, calib, scan_out)
    say("== plan ==")
    verifier = None if args.no_verify else plan_verifier(args, model, spec, data, calib, holdout)
    the_plan = plan.execute(table, need(inputs), plan_out, verifier, args.verify_rounds)
    say("== apply ==")
    missed = apply.execute(args, the_plan, variants, model, spec, data, calib, loader, ft,
                           result_out)
    say("== report ==")
    html = render_report(table, report_out, plan=the_plan, result=result_out)
    say(f"done in {time.perf_counter() - t0:.0f} s")
    if not args.no_verdict:
        say(f"verdict: {verdict_line(the_plan, result_out)}")
        say(f"report: {html}")
    print(os.fspath(out))
    return apply.report_missed("run", missed, variants)


def check_tie_modules(model: Any, patterns: list[str]) -> None:
    """Each --tie pattern matches two modules of ``model`` or more whose names differ only there
    (the scan's units are checked again at plan time): a model without experts fails before a scan
    of hours, not after it."""
    from sensplan.planner import tie_regex

    names = [n for n, _ in model.named_modules() if n]
    for text in patterns:
        rx = tie_regex(text)
        keys = Counter(rx.sub("*", n) for n in names if rx.search(n))
        if not any(c > 1 for c in keys.values()):
            raise UserInputError(f"--tie {text} matches no two modules of the model whose names differ only where it "
                                 f"matches ({sum(keys.values())} matched; e.g. {', '.join(names[:3])}). Drop --tie, or "
                                 f"give a pattern for the part of the names that differs between the units to tie.")


def plan_verifier(args: argparse.Namespace, model: Any, spec: Any, data: Any, calib: Any, holdout: Any) -> Any:
    """The verifier of ``sensplan run``: the model and data in memory, and a held-out split
    (--holdout-data, or items of --data outside the sample and the calibration data)."""
    import numpy as np

    from sensplan.planner import Verifier, split_held
    from sensplan.sensitivity import load_eval_set

    n = args.holdout_samples or None
    used = [data.indices]
    spec_data = data_spec(args.data, args, "--data")
    source = args.calib_data or getattr(args, "train_data", None)
    if calib is not None and (source is None or data_spec(source, args, "--calib-data").same_source(spec_data)):
        used.append(calib.indices)
    exclude = np.concatenate([u for u in used if u is not None])
    draw = None
    if holdout is not None:  # the scan's own data: only what the sample and calibration left
        held = load_eval_set(holdout, n, args.seed + 2, exclude=exclude if holdout.same_source(spec_data) else None)
    else:
        try:
            held = load_eval_set(spec_data, n, args.seed + 2, exclude=exclude)
            draw = {"from": "the scan's data outside its sample and calibration", "n": n, "seed": args.seed + 2,
                    "split_seed": args.seed + 3}
        except UserInputError:
            say(f"note: --data {args.data} has nothing outside the scan's sample and calibration: "
                f"candidates are compared on the scan's sample (pass --holdout-data SPEC)")
            held = None
    notes: list[str] = []
    held, report = split_held(held, args.seed + 3, notes)
    for note in notes:
        say(f"note: {note}")
    verifier = Verifier(model, data, calib, held, report=report, model_spec=spec, device=args.device)
    verifier.held_draw = draw if report is not None else None
    return verifier
