"""``sensplan report``: report.html and PNG charts from the artifacts alone (never a model)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from sensplan.cli._common import Output, Problems, add_verb, check_outputs

if TYPE_CHECKING:
    from sensplan.cli._common import SubParsers

EXAMPLE = """\
  sensplan report --scan scan.json --plan plan.json --result result/ --out report/
  sensplan report --scan scan.json --out report/          # the sensitivity charts alone
  sensplan report --scan scan.json --frontier frontier/frontier.json --out report/
"""


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "report", "Render report.html and PNG charts from the artifacts (never loads "
                                "a model).", EXAMPLE)
    p.add_argument("--scan", required=True, metavar="FILE", help="scan.json")
    p.add_argument("--plan", metavar="FILE", help="plan.json")
    p.add_argument("--result", metavar="DIR", help="the output directory of `sensplan apply`")
    p.add_argument("--frontier", metavar="FILE", help="frontier.json from `sensplan frontier`")
    p.add_argument("--out", default="report", metavar="DIR",
                   help="output directory (default report/)")
    p.add_argument("--force", action="store_true",
                   help="render even when the files do not chain (a plan made from another "
                        "scan, a result of another plan)")
    p.set_defaults(fn=main)


def report_outputs(out: Path, flag: str = "--out") -> list[Output]:
    from sensplan.reports import FIGURES

    return [Output(out, flag, is_dir=True), Output(out / "report.html", flag),
            *(Output(out / f"{name}.png", flag) for name in FIGURES)]


def main(args: argparse.Namespace) -> int:
    from sensplan.reports import render_report

    problems = Problems()
    check_outputs(problems, report_outputs(Path(args.out)))
    problems.raise_if_any()
    path = render_report(args.scan, args.out, plan=args.plan, result=args.result, force=args.force,
                         frontier=args.frontier)
    print(path)
    return 0
