"""``sensplan methods``: the registered compression methods and tasks, with their defaults."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from sensplan.cli._common import add_verb

if TYPE_CHECKING:
    from sensplan.cli._common import SubParsers
    from sensplan.sensitivity import Method

EXAMPLE = """\
  sensplan methods
  sensplan scan ... --methods prune,weight_quant,sparsity --setting sparsity=0.5,0.9
"""


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "methods", "List the compression methods (--methods, --setting) and tasks "
                                 "(--task) that scan can use.", EXAMPLE)
    p.set_defaults(fn=main)


def settings_flag(method: Method) -> str:
    """The default settings as ``--setting`` writes them (JSON when that form cannot say them)."""
    key = method.setting_key
    defaults = [dict(s) for s in method.default_settings]
    text = ",".join(str(s.get(key)) for s in defaults)
    try:
        if key and method.parse_settings(text) == [method.check_setting(s) for s in defaults]:
            return f"{method.name}={text}"
    except (ValueError, TypeError, KeyError):
        pass
    return " ".join(json.dumps(s) for s in defaults)


def main(args: argparse.Namespace) -> int:
    from sensplan.sensitivity import TASKS, get_task
    from sensplan.sensitivity.methods import all_methods

    print("compression methods (--methods; * = scanned by default):")
    for m in all_methods():
        star = " *" if m.default_on else ""
        print(f"  {m.name}{star}")
        print(f"      {m.description}")
        print(f"      axis {m.axis}, unit {m.unit_kind}; default settings: {settings_flag(m)}")
        if m.speed_note:
            print(f"      speed: {m.speed_note}")
    get_task("classification")  # loads the built-in tasks
    print("\ntasks (--task; classification is the default):")
    for t in TASKS:
        print(f"  {t.name}: {t.description}" + ("" if t.needs_labels else " (needs no labels)"))
    return 0
