"""``sensplan frontier``: the Pareto frontier of one cost. The planned and the uniform allocation at
a sweep of budgets, predicted at every budget, applied and measured at a few.

Solving reads scan.json (and cost tables) alone: with --measure 0 no model, data or torch is
needed. To measure, the model and data are rebuilt from what scan.json records, as `sensplan plan`
does to verify, and every measurement is made on held-out items no point's plan was chosen on.
"""

from __future__ import annotations

import argparse
import difflib
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sensplan._errors import UserInputError
from sensplan.cli._common import (
    Output,
    Problems,
    add_runtime_args,
    add_verb,
    check_budget_scale,
    check_outputs,
    check_runtime_args,
    need,
    say,
    set_threads,
)
from sensplan.cli.plan import check_tables_runtime, check_ties, for_runtime

if TYPE_CHECKING:
    from sensplan._tables import Scan
    from sensplan.cli._common import SubParsers
    from sensplan.planner import Frontier

EXAMPLE = """\
  sensplan frontier --scan scan.json --metric size --out frontier/
  sensplan frontier --scan scan.json --metric macs --points 12 --measure 4 --spacing linear --out frontier/
  sensplan frontier --scan scan.json --metric bits --measure 0 --out frontier/   # solve only: no model
  sensplan frontier --scan scan.json --cost-table latency.json --metric latency --runtime onnxruntime \
      --out frontier/
  sensplan apply --model ... --weights ... --data ... --plan frontier/points/03/plan.json --out r3/
"""


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "frontier", "Sweep budgets of one cost: the planned and the uniform allocation at "
                                  "each (predicted), applied and measured at a few; a plan per budget.",
                 EXAMPLE)
    p.add_argument("--scan", required=True, metavar="FILE", help="scan.json from `sensplan scan`")
    p.add_argument("--metric", required=True, metavar="METRIC",
                   help="the cost to sweep: size|macs|bops|params|bits, or a --cost-table metric")
    p.add_argument("--points", type=int, default=8, metavar="N",
                   help="budgets in the sweep, from the cheapest reachable cost up to one step under the "
                        "original (default 8)")
    p.add_argument("--spacing", choices=("log", "linear"), default="log",
                   help="log (the default): each budget a fixed factor above the last, dense where the drop "
                        "changes fastest, near the cheapest end; linear: even steps in cost")
    p.add_argument("--measure", type=int, default=3, metavar="N",
                   help="how many of them to apply and measure, planned and uniform: the tightest, the "
                        "loosest and the rest evenly between (default 3; 0 = solve only, no model needed)")
    g = p.add_argument_group("costs and planning signal (as in `sensplan plan`)")
    g.add_argument("--cost-table", action="append", default=[], metavar="FILE",
                   help="a measured cost table (sensplan.cost_table JSON); its metric can then be swept "
                        "(repeatable)")
    g.add_argument("--signal", default="auto", metavar="NAME",
                   help="what the solver adds up: drop, loss, kl, margin or fisher, as `sensplan plan "
                        "--signal` (default auto)")
    g.add_argument("--time-limit", type=float, default=60.0, metavar="SECONDS",
                   help="stop each budget's solve after this long (default 60)")
    g.add_argument("--tie", action="append", default=[], metavar="experts|REGEX",
                   help="units that get one option together, as `sensplan plan --tie` (repeatable)")
    g.add_argument("--runtime", default="torch", metavar="NAME",
                   help="torch | onnxruntime: offer only the options that run faster or smaller there, as "
                        "`sensplan plan --runtime` (default torch)")
    m = p.add_argument_group("the model and data to measure on (default: what scan.json records)")
    m.add_argument("--weights", metavar="FILE",
                   help="the scan's checkpoint, if it moved (checked against the scan's sha256)")
    m.add_argument("--allow-pickle", action="store_true",
                   help="allow a pickle:FILE model spec (trusted files only)")
    m.add_argument("--holdout-data", metavar="SPEC",
                   help="data to measure on (default: items of the scan's --data outside its sample and "
                        "calibration)")
    m.add_argument("--holdout-samples", type=int, default=5000, metavar="N",
                   help="held-out items used (default 5000; 0 = all)")
    add_runtime_args(p, dtype=False)
    p.add_argument("--out", default="frontier", metavar="DIR",
                   help="output directory: frontier.json, frontier.png and points/NN/plan.json, one plan per "
                        "budget that `sensplan apply --plan` takes (default frontier/)")
    p.set_defaults(fn=main)


def frontier_outputs(out: Path, points: int) -> list[Output]:
    from sensplan.planner import Frontier

    outs = [Output(out, "--out", is_dir=True), *(Output(out / f, "--out") for f in Frontier.FILES)]
    for i in range(max(0, points)):
        plan = out / Frontier.plan_file(i)
        outs += [Output(plan.parent, "--out", is_dir=True), Output(plan, "--out")]
    return outs


def check(args: argparse.Namespace, problems: Problems, scan: Scan | None) -> list[Any]:
    """Every check of the flags that needs no model: the sweep, the metric, the cost tables, the
    signal and the outputs. Returns the cost tables."""
    from sensplan.planner import METRICS, TableCosts

    problems.at_least(args.points, 2, "--points", note=" (a frontier needs two budgets)")
    problems.at_least(args.measure, 0, "--measure", note=" (0 = solve only)")
    if args.points >= 2 and args.measure > args.points:
        problems.add(f"--measure {args.measure} is more than --points {args.points}: it says how many of the "
                     f"swept budgets to apply and measure. Give --measure {args.points} or fewer (0 to solve only), "
                     f"or more --points.")
    problems.at_least(args.time_limit, 0, "--time-limit", strict=True)
    tables = [problems.check(partial(TableCosts.load, path), f"--cost-table {path}: ") for path in args.cost_table]
    known = [*METRICS, *(t.metric for t in tables if t is not None)]
    if args.metric not in known and all(t is not None for t in tables):  # a table that failed to load: said
        close = difflib.get_close_matches(args.metric, known, n=1)
        problems.add(f"--metric {args.metric}: unknown metric. Use one of {', '.join(known)}"
                     + (f" (did you mean --metric {close[0]}?)" if close else "")
                     + "; a measured metric needs its --cost-table (sensplan profile --scan SCAN makes a "
                       "latency table).")
    check_tables_runtime(args.cost_table, tables, args.runtime, problems)
    good = [t for t in tables if t is not None]
    if scan is not None and len(good) == len(tables):  # an unknown --signal, before any solving
        problems.check(partial(check_budget_scale, scan, [], good, args.signal))
    check_ties(problems, args.tie)
    if scan is not None and not problems.messages:
        check_ties(problems, args.tie, scan)
    if args.measure > 0:  # --measure 0 stays torch-free
        check_runtime_args(args, problems)
        problems.at_least(args.holdout_samples, 0, "--holdout-samples", note=" (0 = all)")
    check_outputs(problems, frontier_outputs(Path(args.out), args.points))
    return good


def verifier(args: argparse.Namespace, scan: Scan) -> tuple[Any, list[str]]:
    """The scan's model and data, rebuilt and checked, with the held-out items to measure on."""
    from sensplan.planner import verifier_from_scan

    try:
        return verifier_from_scan(scan, weights=args.weights, allow_pickle=args.allow_pickle,
                                  holdout=args.holdout_data, holdout_samples=args.holdout_samples or None,
                                  device=args.device)
    except UserInputError as e:  # its fixes name plan's way to skip measuring; here it is --measure 0
        raise type(e)(str(e).replace("--no-verify", "--measure 0")) from None


def print_frontier(frontier: Frontier) -> None:
    """The budgets with the predicted (and measured) drops of the planned and uniform allocations."""
    from tabulate import tabulate

    data = frontier.data
    rows = []
    for p in data["points"]:
        uni = p.get("uniform")
        frac = p["budget"]["fraction"]
        rows.append([p["index"], f"{frac:.3f}" if frac is not None else f"{p['budget']['absolute']:.6g}",
                     f"{p['planned']['predicted']['drop']:.4f}",
                     f"{uni['predicted']['drop']:.4f} ({uni['label']})" if uni else "– (none fits)",
                     _measured(p["planned"]), _measured(uni)])
    metric = data["metric"]
    say(tabulate(rows, headers=["point", f"{metric} budget", "planned drop", "uniform drop",
                                "measured planned", "measured uniform"], tablefmt="simple",
                 disable_numparse=True))
    ms = data.get("measurement")
    say("drops are predicted from the scan (fractions of the score; positive = worse)"
        + (f"; measured on {ms['measured_on']}, ± one paired standard error" if ms else "; nothing measured"))


def _measured(entry: Any) -> str:
    m = (entry or {}).get("measured")
    return f"{m['drop']:.4f} ± {m['drop_se']:.4f}" if m else ""


def main(args: argparse.Namespace) -> int:
    from sensplan._tables import Scan
    from sensplan.planner import make_frontier, measure_frontier, measured_points

    problems = Problems()
    scan = problems.check(partial(Scan.load, args.scan))
    tables = check(args, problems, scan)
    problems.raise_if_any()
    scan = need(scan)
    ver: Any = None
    if args.measure > 0:  # the model and data first: a missing weights file fails before the solving
        set_threads(args)
        ver, notes = verifier(args, scan)
        for n in notes:
            if not n.startswith("the held-out split has only"):  # plan's selection split: not one here
                say(f"note: {n}")
    scan, _ = for_runtime(scan, args.runtime)
    try:
        say(f"solving {args.points} budgets of {args.metric} ...")
        frontier = make_frontier(scan, args.metric, args.points, spacing=args.spacing, cost_models=tables,
                                 signal=args.signal, time_limit=args.time_limit, tie=args.tie)
        if ver is not None:
            frontier = measure_frontier(frontier, ver, measured_points(args.points, args.measure), progress=say)
    finally:
        if ver is not None:
            ver.close()
    saved = frontier.save(Path(args.out))
    print_frontier(saved)
    print(saved.path)
    return 0
