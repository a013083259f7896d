"""``sensplan models``: the models in sensplan's own registry (``--model sensplan:NAME``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sensplan._errors import UserInputError
from sensplan.cli._common import add_verb

if TYPE_CHECKING:
    from sensplan.cli._common import SubParsers

EXAMPLE = """\
  sensplan models
  sensplan models 'tiny*'
"""


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "models", "List the models in sensplan's own registry (spec sensplan:NAME).",
                 EXAMPLE)
    p.add_argument("pattern", nargs="?", default="*", help="a glob pattern (default *)")
    p.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
    from sensplan.sensitivity import list_models

    names = list_models(args.pattern)
    if not names:
        raise UserInputError(f"No sensplan model matches {args.pattern!r}. Known: "
                             f"{', '.join(list_models())}.")
    for name in names:
        print(f"sensplan:{name}")
    return 0
