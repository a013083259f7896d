"""``sensplan validate``: check artifacts and the digest chain between them, loading no model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from sensplan._errors import UserInputError
from sensplan.cli._common import Output, add_verb, output_problem

if TYPE_CHECKING:
    from sensplan.cli._common import SubParsers

EXAMPLE = """\
  sensplan validate scan.json plan.json result/     # each file, and plan <- scan, result <- plan
  sensplan validate runs/r20/scan.json runs/r20/plan.json runs/r20/result/model.sensplan
  sensplan validate old_plan.json --migrate plan_v2.json   # an older plan, written at the current version
"""


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "validate", "Check scan, plan, result (metrics.json or its directory), "
                                  "cost-table and model.sensplan files, and that they chain.",
                 EXAMPLE)
    p.add_argument("files", nargs="+", metavar="FILE", help="the files to check")
    p.add_argument("--migrate", metavar="OUT", default=None,
                   help="with one plan FILE: write it, migrated to the current plan.json schema_version, to "
                        "OUT (the plan itself is never rewritten; every command reads an older plan as "
                        "migrated anyway). The plan's schema is docs/plan.schema.json")
    p.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
    from sensplan._validate import validate_files, write_migrated

    if args.migrate is not None and len(args.files) != 1:
        raise UserInputError(f"--migrate writes one plan: give one plan FILE, not {len(args.files)} files "
                             f"(e.g. sensplan validate plan.json --migrate plan_v2.json).")
    if args.migrate is not None:  # before checking: an unwritable OUT is one line, not a traceback after it
        why = output_problem(Output(Path(args.migrate), "--migrate"))
        if why:
            raise UserInputError(why)
    notes: list[str] = []
    problems = validate_files(list(args.files), notes)
    shown: set[int] = set()
    for path in args.files:
        mine = [i for i, p in enumerate(problems) if p.startswith(f"{path}: ")]
        shown.update(mine)
        if not mine:
            print(f"{path}: OK")
        for note in notes:
            if note.startswith(f"{path}: "):
                print(note)
        for i in mine:
            print(problems[i])
    for i, p in enumerate(problems):
        if i not in shown:
            print(p)
    if problems:
        raise UserInputError(f"{len(problems)} problem(s) found; see above.")
    if args.migrate is not None:
        print(write_migrated(args.files[0], args.migrate))
    return 0
