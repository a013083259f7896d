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
    p = add_verb(sub, "methods", "List the compression methods (--methods, --setting), tasks "
                                 "(--task) and cost models (plan --cost-model) there are, and where "
                                 "each comes from (built in, or another package's entry point).", EXAMPLE)
    p.set_defaults(fn=main)


def settings_flag(method: Method, transformer: bool = False) -> str:
    """The default settings as ``--setting`` writes them (JSON when that form cannot say them);
    ``transformer``: those for a transformer (``--model hf:...``)."""
    key = method.setting_key
    chosen = method.transformer_settings if transformer and method.transformer_settings else method.default_settings
    defaults = [dict(s) for s in chosen]
    text = ",".join(method.label(s).removeprefix("int") if key == "bits" else str(s.get(key)) for s in defaults)
    try:
        if key and method.parse_settings(text) == [method.check_setting(s) for s in defaults]:
            return f"{method.name}={text}"
    except (ValueError, TypeError, KeyError):
        pass
    return " ".join(json.dumps(s) for s in defaults)


def main(args: argparse.Namespace) -> int:
    from sensplan.planner import COST_MODELS
    from sensplan.sensitivity import METHODS, TASKS
    from sensplan.sensitivity.methods import all_methods
    from sensplan.sensitivity.tasks import load_builtin_tasks

    print("compression methods (--methods; * = scanned by default):")
    for m in all_methods():
        star = " *" if m.default_on else ""
        print(f"  {m.name}{star}")
        print(f"      {m.description}")
        print(f"      axis {m.axis}, unit {m.unit_kind}; default settings: {settings_flag(m)}")
        if m.transformer_settings:
            print(f"      on a transformer (--model hf:...): {settings_flag(m, transformer=True)}")
        if m.unit_kind == "group":
            print("      on a transformer (--model hf:...) its groups are attention heads (a KV head with "
                  "its query heads) and MLP channels")
        if m.speed_note:
            print(f"      speed: {m.speed_note}")
        print(f"      from: {METHODS.origin(m.name)}")
    load_builtin_tasks()
    print("\ntasks (--task; classification is the default):")
    for t in TASKS:
        print(f"  {t.name}: {t.description}" + ("" if t.needs_labels else " (needs no labels)")
              + _elsewhere(TASKS.origin(t.name)))
    COST_MODELS.load_entry_points(lambda obj: obj)
    print("\ncost models (plan --budget METRIC=...): analytic (size, macs, bops, params, bits; built-in), "
          "table (plan --cost-table FILE; built-in)")
    for name in COST_MODELS.names():
        metrics = ", ".join(getattr(COST_MODELS.get(name), "metrics", ()))
        print(f"  {name} (plan --cost-model {name}): {metrics}{_elsewhere(COST_MODELS.origin(name))}")
    broken = [*METHODS.broken, *TASKS.broken, *COST_MODELS.broken]
    if broken:
        print("\nplug-ins that failed to load (left out):")
        for b in broken:
            print(f"  {b}")
    return 0


def _elsewhere(origin: str) -> str:
    return "" if origin == "built-in" else f" [from: {origin}]"
