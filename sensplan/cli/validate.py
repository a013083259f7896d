"""``sensplan validate``: check artifacts and the digest chain between them, loading no model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sensplan._errors import UserInputError
from sensplan.cli._common import add_verb

if TYPE_CHECKING:
    from sensplan.cli._common import SubParsers

EXAMPLE = """\
  sensplan validate scan.json plan.json result/     # each file, and plan <- scan, result <- plan
  sensplan validate runs/r20/scan.json runs/r20/plan.json runs/r20/result/model.sensplan
"""


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "validate", "Check scan, plan, result (metrics.json or its directory), "
                                  "cost-table and model.sensplan files, and that they chain.",
                 EXAMPLE)
    p.add_argument("files", nargs="+", metavar="FILE", help="the files to check")
    p.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
    from sensplan._validate import validate_files

    problems = validate_files(list(args.files))
    shown: set[int] = set()
    for path in args.files:
        mine = [i for i, p in enumerate(problems) if p.startswith(f"{path}: ")]
        shown.update(mine)
        if not mine:
            print(f"{path}: OK")
        for i in mine:
            print(problems[i])
    for i, p in enumerate(problems):
        if i not in shown:
            print(p)
    if problems:
        raise UserInputError(f"{len(problems)} problem(s) found; see above.")
    return 0
