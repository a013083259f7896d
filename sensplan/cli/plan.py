"""``sensplan plan``: the best per-unit allocation for a budget (exact MILP) and the uniform plan.

It reads scan.json and optional measured cost tables, solves, then verifies the plan by measuring it
on the scan's model and data (rebuilt from what scan.json records, checked by digest), corrects the
drop model and solves again, and keeps the best measured candidate among its rounds and the uniform
plans. With --no-verify it is torch-free: files in, file out.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sensplan.cli._common import (
    Output,
    Problems,
    add_runtime_args,
    add_verb,
    check_budget_scale,
    check_file_out,
    check_outputs,
    check_runtime_args,
    need,
    say,
    set_threads,
)

if TYPE_CHECKING:
    from sensplan._tables import Scan
    from sensplan.cli._common import SubParsers
    from sensplan.planner import Budget, Plan, TableCosts

EXAMPLE = """\
  sensplan plan --scan scan.json --budget macs=0.5 --out plan.json
  sensplan plan --scan scan.json --budget size=25% --budget macs=0.8 --out plan.json
  sensplan plan --scan scan.json --max-drop 0.01 --minimize size --out plan.json
  sensplan plan --scan scan.json --cost-table latency.json --budget latency_ms=0.6 --out plan.json
"""


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "plan", "Solve the per-unit allocation for a budget (exact MILP), beside the "
                              "uniform plan.", EXAMPLE)
    p.add_argument("--scan", required=True, metavar="FILE", help="scan.json from `sensplan scan`")
    add_budget_args(p)
    add_verify_args(p)
    g = p.add_argument_group("the model and data for verification (default: what scan.json records)")
    g.add_argument("--weights", metavar="FILE",
                   help="the scan's checkpoint, if it moved (checked against the scan's sha256)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow a pickle:FILE model spec (trusted files only)")
    g.add_argument("--no-memo", action="store_true",
                   help="measure every candidate again: do not read or extend scan.json.verified, where "
                        "verification keeps its measurements for later plans of the same scan")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="measure the uniform candidates side by side on N local worker processes, each "
                        "rebuilding the model and data from scan.json (on GPUs: one each in turn)")
    add_runtime_args(p, dtype=False)
    p.add_argument("--runtime", default="torch", metavar="NAME",
                   help="torch | onnxruntime: offer only the options that run faster or smaller there "
                        "(on onnxruntime: no sparsity, no 16-bit floats, integers at 8 bits only); the "
                        "ones left out are listed (default torch)")
    p.add_argument("--out", default="plan.json", metavar="FILE",
                   help="where to write the plan (default plan.json)")
    p.set_defaults(fn=main)


def add_verify_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verification (measure the plan before writing it)")
    g.add_argument("--no-verify", action="store_true",
                   help="write the solver's plan without measuring it (no model or data needed)")
    g.add_argument("--verify-rounds", type=int, default=3, metavar="N",
                   help="solves at most: each round measures the plan; when the measurement falls "
                        "outside the prediction's interval the drop model is corrected and solved "
                        "again (default 3)")
    g.add_argument("--holdout-data", metavar="SPEC",
                   help="held-out data to choose the final plan on (default: items of the scan's "
                        "--data outside its sample and calibration)")
    g.add_argument("--holdout-samples", type=int, default=5000, metavar="N",
                   help="held-out items used (default 5000; 0 = all)")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget")
    g.add_argument("--budget", action="append", default=[], metavar="METRIC=VALUE",
                   help="size|macs|bops|params|bits (or a --cost-table metric, e.g. latency); a "
                        "fraction (0.5, 50%%) of the original or an absolute value (2MB, 20M; bits: "
                        "mean stored bits per weight, e.g. bits=4.5). Repeat for several budgets.")
    g.add_argument("--max-drop", metavar="DROP",
                   help="instead: the cheapest plan whose predicted drop is at most DROP "
                        "(0.01 or 1%%)")
    g.add_argument("--minimize", metavar="METRIC",
                   help="the cost to minimise with --max-drop: size|macs|bops|params|bits or a "
                        "--cost-table metric (default: the first budget's metric)")
    g.add_argument("--cost-table", action="append", default=[], metavar="FILE",
                   help="a measured cost table (sensplan.cost_table JSON, e.g. latency per unit "
                        "and setting); its metric can then be budgeted (repeatable)")
    g.add_argument("--cost-model", action="append", default=[], metavar="NAME",
                   help="a cost model another installed package registers (entry point group "
                        "sensplan.cost_models; `sensplan methods` lists them); its metrics can then "
                        "be budgeted (repeatable)")
    g.add_argument("--signal", default="auto", metavar="NAME",
                   help="what the solver adds up: drop (the task's measured drop per unit), or a "
                        "low-noise signal the scan recorded: loss, kl, margin (classification), fisher "
                        "(a --fast scan's estimate). The plan's drop is then predicted from the sum by a "
                        "monotone map fitted on the scan's measured probes. Default auto: fisher for a "
                        "--fast scan, else kl where the scan recorded it, else drop")
    g.add_argument("--tie", action="append", default=[], metavar="experts|REGEX",
                   help="units whose names differ only where REGEX matches get one option together; "
                        "experts: each MoE layer's experts get one bit width per projection and one "
                        "pruned width, the form fused expert kernels and save_pretrained take "
                        "(repeatable)")
    g.add_argument("--time-limit", type=float, default=60.0, metavar="SECONDS",
                   help="stop the solver after this long; the plan is then feasible but maybe "
                        "not optimal (default 60)")


@dataclass(frozen=True)
class PlanInputs:
    budgets: list[Budget]
    max_drop: float | None
    minimize: str | None
    cost_tables: list[TableCosts]
    time_limit: float
    cost_models: tuple[str, ...] = ()
    signal: str = "auto"
    runtime: str = "torch"
    tie: tuple[str, ...] = ()

    def models(self, scan: Scan) -> list[Any]:
        """The cost tables and the named cost models, built for ``scan``."""
        from sensplan.planner import make_cost_model

        return [*self.cost_tables, *(make_cost_model(n, scan) for n in self.cost_models)]


def check(args: argparse.Namespace, problems: Problems) -> PlanInputs | None:
    """The budgets, objective and cost tables from the flags (no scan needed)."""
    from sensplan.planner import METRICS, Budget, TableCosts, cost_model_metrics, parse_max_drop
    from sensplan.planner._plan import check_objective

    problems.at_least(args.time_limit, 0, "--time-limit", strict=True)
    check_ties(problems, args.tie)
    runtime = getattr(args, "runtime", "torch")
    tables = [problems.check(partial(TableCosts.load, path), f"--cost-table {path}: ")
              for path in args.cost_table]
    named = [problems.check(partial(cost_model_metrics, n), f"--cost-model {n}: ") for n in args.cost_model]
    known = [*METRICS, *(t.metric for t in tables if t is not None), *(m for ms in named if ms for m in ms)]
    check_tables_runtime(args.cost_table, tables, runtime, problems)
    budgets = [problems.check(partial(Budget.parse, text)) for text in args.budget]
    table_units = {t.metric: t.unit for t in tables if t is not None}
    loaded = all(t is not None for t in tables)  # else a metric a table would add is unknown: said above
    for text, b in zip(args.budget, budgets, strict=True):
        if b is not None and b.unit in ("ms", "us", "s") and table_units.get(b.metric, "ms") != "ms":
            problems.add(f"--budget {text}: a time is read in milliseconds, but the cost table of {b.metric!r} is "
                         f"in {table_units[b.metric] or 'no unit'}. Give the budget as a fraction ({b.metric}=0.6) "
                         f"or in the table's unit, without a suffix.")
        if b is not None and b.metric not in known and loaded:
            problems.add(f"--budget {text}: unknown metric {b.metric!r}. Use one of "
                         f"{', '.join(known)}; a measured metric needs its --cost-table (sensplan profile "
                         f"--scan SCAN makes a latency table).")
    if args.minimize is not None and args.minimize not in known and loaded:
        problems.add(f"--minimize {args.minimize}: unknown metric. Use one of {', '.join(known)}.")
    max_drop = (problems.check(partial(parse_max_drop, args.max_drop))
                if args.max_drop is not None else None)
    good = [b for b in budgets if b is not None]
    if len(good) == len(budgets):
        problems.check(partial(Budget.check_distinct, good, args.budget))
    if len(good) == len(budgets) and (args.max_drop is None or max_drop is not None):
        problems.check(partial(check_objective, good, max_drop, args.minimize))
    if problems.messages:
        return None
    return PlanInputs(good, max_drop, args.minimize, [need(t) for t in tables], args.time_limit,
                      tuple(dict.fromkeys(args.cost_model)),  # the same model named twice counts once
                      args.signal, runtime, tuple(dict.fromkeys(args.tie)))


def check_ties(problems: Problems, texts: Sequence[str], scan: Scan | None = None) -> None:
    """Each --tie pattern compiles; with the ``scan``, each also ties two of its units or more."""
    from sensplan.planner import blocks_from_scan, tie_regex, tied_blocks

    if scan is None:
        for text in texts:
            problems.check(partial(tie_regex, text))
    elif texts:
        problems.check(partial(tied_blocks, blocks_from_scan(scan), texts))


def check_tables_runtime(paths: Sequence[str], tables: Sequence[Any], runtime: str, problems: Problems) -> None:
    """--runtime names a runtime, and every latency table from `sensplan profile` was measured on it
    (an ONNX Runtime table prices int8 layers that run in float elsewhere)."""
    from sensplan.planner import RUNTIMES

    if runtime not in RUNTIMES:
        problems.add(f"--runtime takes one of {', '.join(RUNTIMES)}. Got {runtime!r}.")
        return
    for path, t in zip(paths, tables, strict=True):
        measured_on = (t.profile.get("runtime") if t is not None else None) or runtime
        if measured_on != runtime and measured_on in RUNTIMES:
            problems.add(f"--cost-table {path} was measured on {measured_on} (sensplan profile --runtime "
                         f"{measured_on}); its prices hold there only. Add --runtime {measured_on}, or profile "
                         f"again with --runtime {runtime}.")


def for_runtime(scan: Scan, runtime: str) -> tuple[Scan, list[str]]:
    """``scan`` with only the options that have a kernel on ``runtime``, and a line per option left
    out (each said to the user)."""
    from sensplan.planner import runtime_options, summarize_dropped

    scan, dropped = runtime_options(scan, runtime)
    lines = summarize_dropped(dropped)
    for line in lines:
        say(f"--runtime {runtime}: not offered: {line}")
    return scan, lines


#: the fewest held-out items a verdict may rest on
MIN_HOLDOUT = 50


def check_verify(args: argparse.Namespace, problems: Problems) -> None:
    if args.no_verify:
        return
    problems.at_least(args.verify_rounds, 1, "--verify-rounds")
    problems.at_least(args.holdout_samples, 0, "--holdout-samples")
    if 0 < args.holdout_samples < MIN_HOLDOUT:
        problems.add(f"--holdout-samples {args.holdout_samples} is too few to choose between plans: a "
                     f"difference measured on so few items is noise (one item is {100 / args.holdout_samples:.0f} "
                     f"points). Give at least {MIN_HOLDOUT}, 0 for all, or --no-verify.")


def execute(scan: Scan, inputs: PlanInputs, out: Path, verifier: Any = None, rounds: int = 3,
            notes: Sequence[str] = (), started: float | None = None) -> Plan:
    from sensplan.planner import Plan, make_plan

    for n in notes:
        say(f"note: {n}")
    scan, lines = for_runtime(scan, inputs.runtime)
    if verifier is not None:
        say("verifying: measuring the plan, its corrections and the uniform candidates ...")
    made = make_plan(scan, inputs.budgets, max_drop=inputs.max_drop, minimize=inputs.minimize,
                     time_limit=inputs.time_limit, cost_models=inputs.models(scan), verifier=verifier,
                     rounds=rounds, signal=inputs.signal, tie=inputs.tie)
    for b in made.data["objective"]["budgets"]:
        original = made.data["original"].get(b["metric"])
        if original is not None and b["absolute"] >= original * (1 - 1e-9):
            fix = ("nothing needs compressing for it" if b["kind"] == "fraction" else
                   f"read as an absolute value, not a fraction of the original ({b['metric']}=0.5 is half)")
            say(f"note: the original model already meets --budget {b['metric']}={b['value']:g} (it costs "
                f"{original:.4g}, the budget allows {b['absolute']:.4g}): {fix}.")
    for table in inputs.cost_tables:
        if table.unpriced:
            say(f"note: --cost-table {table.path} does not price {len(table.unpriced)} option(s) of this scan "
                f"(e.g. {table.unpriced[0]}); they cost as the unit uncompressed. Was it profiled from this scan "
                f"(sensplan profile --scan {scan.path or 'scan.json'})?")
    if inputs.runtime != "torch":
        made = Plan({**made.data, "runtime": {"name": inputs.runtime, "not_offered": lines}})
    plan = made.save(out)
    print_plan(plan)
    print_verification(plan, time.perf_counter() - started if started is not None else None)
    solver = plan.data["plans"]["planned"].get("solver", {})
    if not solver.get("optimal", True):
        say(f"note: the solver stopped before proving the plan optimal ({solver.get('status')}; "
            f"relative gap {solver.get('gap', 0.0):.2g}). The plan meets the budget; raise "
            f"--time-limit (now {inputs.time_limit:g} s) to search longer.")
    return plan


def print_plan(plan: Plan) -> None:
    from tabulate import tabulate

    metrics = list(plan.data["original"])
    rows: list[list[Any]] = []
    for name in ("planned", "uniform"):
        v = plan.data["plans"].get(name)
        if v is None:
            rows.append([name, "no uniform plan meets the budget"])
            continue
        p = v["predicted"]
        rows.append([name, f"{p['drop']:.4f}"]
                    + [_fraction(p.get(f"{m}_fraction")) for m in metrics])
    headers = ["allocation", "predicted drop", *(f"{m} fraction" for m in metrics)]
    say(tabulate(rows, headers=headers, tablefmt="simple"))


def print_verification(plan: Plan, seconds: float | None = None) -> None:
    """The rounds, the uniform candidates and the verdict; ``seconds``: the whole verification's
    wall time, loading the model and data included (plan.json's ``seconds`` counts the measuring)."""
    ver = plan.data.get("verification")
    if not ver:
        return
    for r in ver["rounds"]:
        if "stopped" in r:
            say(f"  round {r['round']}: stopped: {r['stopped']}")
            continue
        held = r.get("held_out")
        say(f"  round {r['round']}: predicted drop {r['predicted']['drop']:.4f} "
            f"[{r['predicted']['drop_interval'][0]:.4f}, {r['predicted']['drop_interval'][1]:.4f}], "
            f"measured {r['sample']['drop']:.4f} on the scan sample"
            + (f", {held['drop']:.4f} held-out" if held else "")
            + ("" if r["within_interval"] else " (outside: corrected)" if "correction" in r
               else " (outside the interval)"))
    for u in ver["uniform"]:
        held, sample = u.get("held_out"), u.get("sample")
        say(f"  uniform {u['label']}: predicted {u['predicted']['drop']:.4f}, measured "
            + ", ".join([*([f"{sample['drop']:.4f} on the scan sample"] if sample else []),
                         *([f"{held['drop']:.4f} held-out"] if held else [])]))
    took = seconds if seconds is not None else float(ver["seconds"])
    say(f"verdict: {ver['verdict']} ({took:.0f} s of verification)")


def _fraction(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def main(args: argparse.Namespace) -> int:
    from sensplan._tables import Scan

    problems = Problems()
    scan = problems.check(partial(Scan.load, args.scan))
    inputs = check(args, problems)
    if scan is not None and inputs is not None:  # macs=2 (2 MACs) is caught before any work
        problems.check(partial(check_budget_scale, scan, inputs.budgets, inputs.models(scan), inputs.signal))
        if inputs.tie:  # before verification loads the model
            check_ties(problems, inputs.tie, scan)
    check_verify(args, problems)
    problems.at_least(args.workers, 1, "--workers")
    if not args.no_verify:  # --no-verify stays torch-free
        check_runtime_args(args, problems)
    check_file_out(problems, args.out, "plan.json")
    check_outputs(problems, [Output(Path(args.out), "--out")])
    problems.raise_if_any()
    verifier: Any = None
    notes: list[str] = []
    if not args.no_verify:
        from sensplan.planner import verifier_from_scan

        set_threads(args)
        started = time.perf_counter()
        verifier, notes = verifier_from_scan(need(scan), weights=args.weights, allow_pickle=args.allow_pickle,
                                             holdout=args.holdout_data,
                                             holdout_samples=args.holdout_samples or None,
                                             device=args.device, workers=args.workers, memo=not args.no_memo)
    try:
        execute(need(scan), need(inputs), Path(args.out), verifier, args.verify_rounds, notes,
                started if verifier is not None else None)
    finally:
        if verifier is not None:
            verifier.close()
    print(os.fspath(args.out))
    return 0
