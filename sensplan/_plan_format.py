"""plan.json's format, declared once: its version, its JSON Schema, and the migrations from older versions.

The schema is package data (``sensplan/schemas/plan.schema.json``; ``docs/plan.schema.json`` is a
link to it), so ``sensplan validate`` checks a plan the same way from a wheel as from the
repository. :func:`schema_problems` reports each violation as one line naming its JSON path.

A plan of an older ``schema_version`` is read by migrating it in memory, one registered step per
version (:func:`migration`), never by rewriting the user's file. To bump the version: write the
step from the current version with ``@migration(CURRENT, "what changed")``, raise
``PLAN_SCHEMA_VERSION``, change the schema's ``schema_version`` const and the writer, and add a
row to the version history in docs/formats.md. Example::

    obj = migrate_plan(json.loads(Path("old_plan.json").read_text()))
    obj["schema_version"] == PLAN_SCHEMA_VERSION  # and obj["migrated"] says from which version
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

from sensplan._artifacts import read_json
from sensplan._errors import ArtifactError, UserInputError

PLAN_FORMAT = "sensplan.plan"
PLAN_SCHEMA_VERSION = 2
#: the schema, as package data of ``sensplan``
SCHEMA_FILE = "schemas/plan.schema.json"
#: at most this many schema problems are listed; the rest are counted
MAX_PROBLEMS = 20

Step = Callable[[dict[str, Any]], dict[str, Any]]
#: from_version -> (step to from_version + 1, what changed, in words)
_STEPS: dict[int, tuple[Step, str]] = {}


# -- the schema ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def plan_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of plan.json at :data:`PLAN_SCHEMA_VERSION`."""
    text = resources.files("sensplan").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    try:
        import jsonschema
    except ImportError:  # a dependency of sensplan: only a broken install lacks it
        raise UserInputError("Checking a plan needs the jsonschema package, a dependency of sensplan that is "
                             "not installed here. Install it: pip install 'jsonschema>=4.18'.") from None
    return jsonschema.Draft202012Validator(plan_schema())


def schema_problems(obj: Any, limit: int = MAX_PROBLEMS) -> list[str]:
    """Each way ``obj`` breaks the plan.json schema, as one line starting with its JSON path
    (``plans.planned.choices['weight:fc'].kind: 'grp' is not one of ['group', 'layer']``); at most
    ``limit`` lines, then one that counts the rest. Empty = valid."""
    lines: list[str] = []
    for e in sorted(_validator().iter_errors(obj), key=lambda e: ([str(p) for p in e.absolute_path], e.message)):
        line = _line(e)
        if line not in lines:
            lines.append(line)
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more schema problems"]
    return lines


_NAMES = {"object": "an object", "array": "a list", "string": "a string", "number": "a number",
          "integer": "an integer", "boolean": "true or false", "null": "null"}


def json_path(parts: Sequence[str | int]) -> str:
    """``["plans", "planned", "choices", "weight:fc"]`` -> ``plans.planned.choices['weight:fc']``."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", p):
            out += f".{p}" if out else p
        else:
            out += f"[{p!r}]"
    return out or "the plan"


def _show(v: Any) -> str:
    """A value as the line quotes it: JSON's words for null and booleans, else Python's repr."""
    text = json.dumps(v) if v is None or isinstance(v, bool) else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _line(e: Any) -> str:
    where = json_path(list(e.absolute_path))
    if e.validator == "required":
        m = re.match(r"^(.*) is a required property$", e.message)
        return f"{where} lacks {m.group(1) if m else e.message}"
    if e.validator == "type":
        want = [str(t) for t in (e.validator_value if isinstance(e.validator_value, list) else [e.validator_value])]
        return f"{where} is {_show(e.instance)}, not {' or '.join(_NAMES.get(t, t) for t in want)}"
    if e.validator == "const":
        return f"{where} is {_show(e.instance)}, not {_show(e.validator_value)}"
    if e.validator == "maxProperties" and e.validator_value == 0:
        return f"{where} is {_show(e.instance)}; it must be empty where method is null (no compression)"
    return f"{where}: {e.message}"


# -- semantic checks the schema cannot express ----------------------------------------------------
def semantic_problems(obj: Mapping[str, Any]) -> list[str]:
    """What a schema-valid plan may still get wrong: a non-finite number (Python's JSON reader
    accepts ``NaN``), a choice filed under another block's key (``AXIS:UNIT``), a unit drop for a
    block the allocation does not list."""
    out = [f"{json_path(path)} is {v}, not a finite number (sensplan writes null for that)"
           for path, v in _numbers(obj, ()) if not math.isfinite(v)][:MAX_PROBLEMS]
    for name, alloc in (obj.get("plans") or {}).items():
        if not isinstance(alloc, Mapping):
            continue
        choices = alloc.get("choices") or {}
        for key, c in choices.items():
            if f"{c.get('axis')}:{c.get('unit')}" != key:
                out.append(f"plans.{name}.choices[{key!r}] is the choice of {c.get('axis')}:{c.get('unit')}: a "
                           f"block's key is AXIS:UNIT")
        extra = [k for k in alloc.get("unit_drops") or {} if k not in choices]
        if extra:
            out.append(f"plans.{name}.unit_drops names {extra[0]!r}, which plans.{name}.choices lacks")
    return out


def _numbers(v: Any, path: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], float]]:
    if isinstance(v, float):
        yield path, v
    elif isinstance(v, Mapping):
        for k, x in v.items():
            yield from _numbers(x, (*path, str(k)))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _numbers(x, (*path, i))


# -- reading and migrating ------------------------------------------------------------------------
def migration(from_version: int, summary: str) -> Callable[[Step], Step]:
    """Register ``fn`` as the step from plan.json ``from_version`` to ``from_version + 1``. The step
    gets a deep copy and returns the new object; ``summary`` says what changed, in words."""
    def register(fn: Step) -> Step:
        if from_version in _STEPS:
            raise ValueError(f"A migration from plan schema_version {from_version} is already registered.")
        _STEPS[from_version] = (fn, summary)
        return fn
    return register


def readable_versions() -> tuple[int, ...]:
    """Every plan.json ``schema_version`` this sensplan reads: the current one, and each older one
    with a chain of migrations up to it."""
    older = [v for v in sorted(_STEPS, reverse=True) if all(u in _STEPS for u in range(v, PLAN_SCHEMA_VERSION))]
    return (*sorted(older), PLAN_SCHEMA_VERSION)


def migrate_plan(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` (a plan.json object of any readable version) at :data:`PLAN_SCHEMA_VERSION`.

    A current plan comes back as it is (a ``dict``); an older one as a new object migrated step by
    step, with ``migrated: {from, to, steps}`` saying so. ``obj`` is never modified. A version
    this sensplan cannot read raises :class:`ArtifactError` naming what to do."""
    v = obj.get("schema_version")
    if v == PLAN_SCHEMA_VERSION:
        return obj if isinstance(obj, dict) else dict(obj)
    if isinstance(v, int) and not isinstance(v, bool) and v > PLAN_SCHEMA_VERSION:
        raise ArtifactError(f"The plan has schema_version {v}: a newer sensplan wrote it (this one reads up to "
                            f"{PLAN_SCHEMA_VERSION}). Upgrade sensplan (pip install -U sensplan), or make the "
                            f"plan again with this one (`sensplan plan`).")
    if v not in readable_versions():
        raise ArtifactError(f"The plan has schema_version {v!r}, which no sensplan wrote; this one reads "
                            f"{', '.join(map(str, readable_versions()))}. Make the plan again with `sensplan plan`.")
    out = copy.deepcopy(dict(obj))
    steps = []
    while (at := int(out["schema_version"])) != PLAN_SCHEMA_VERSION:
        fn, summary = _STEPS[at]
        steps.append(f"{at} -> {at + 1}: {summary}")
        out = fn(out)
        out["schema_version"] = at + 1
    out["migrated"] = {"from": v, "to": PLAN_SCHEMA_VERSION, "steps": steps}
    return out


def read_plan(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The plan.json object at ``path`` at the current version (migrated in memory if older; the
    file is never rewritten). Raises :class:`ArtifactError` for a missing, non-JSON, non-plan file
    or a version this sensplan cannot read."""
    obj = read_json(path, PLAN_FORMAT, readable_versions())
    try:
        return migrate_plan(obj)
    except ArtifactError as e:
        raise ArtifactError(f"{str(path)!r}: {e}") from None


def migration_note(obj: Mapping[str, Any]) -> str | None:
    """One line saying that ``obj`` was migrated (None when it was not)."""
    m = obj.get("migrated")
    if not isinstance(m, Mapping):
        return None
    return (f"read as plan.json schema_version {m.get('to')}, migrated in memory from version {m.get('from')} "
            f"(the file is unchanged; `sensplan validate --migrate OUT` writes the migrated plan)")


# -- the steps -------------------------------------------------------------------------------------
#: version 1 knew one task (classification, top-1) and two methods: prune (groups) and per-channel
#: integer weight quantization (layers; 32 bits = float, unchanged)
_V1_METRIC = {"name": "top1", "higher_is_better": True, "unit": "fraction"}
_V1_FLOAT_BITS = 32
_ANALYTIC_UNITS = {"size": "bytes", "macs": "per sample", "bops": "per sample", "params": "count"}


def _v1_bits(bits: int) -> dict[str, Any]:
    """A version-1 ``quantize`` entry's bits as a version-2 choice's method fields."""
    if bits == _V1_FLOAT_BITS:
        return {"method": None, "setting": {}, "label": "none", "effect": {}}
    return {"method": "weight_quant", "setting": {"bits": bits}, "label": f"int{bits}",
            "effect": {"weight_bits": bits, "weight_dtype": "int", "scale_bits": 32}}


def _v1_option_key(bits: int) -> str:
    # the planner's option key: method, then the setting as compact JSON with sorted keys
    return "none" if bits == _V1_FLOAT_BITS else "weight_quant:" + json.dumps({"bits": bits}, separators=(",", ":"))


def _v1_allocation(alloc: Any, where: str) -> Any:
    if not isinstance(alloc, Mapping):
        return alloc  # null (no uniform plan), or a problem the schema names
    prune, quantize = alloc.get("prune"), alloc.get("quantize")
    if not isinstance(prune, Mapping) or not isinstance(quantize, Mapping):
        raise ArtifactError(f"{where} of this schema_version 1 plan lacks its 'prune' and 'quantize' objects, so "
                            f"it cannot be migrated. Make the plan again with `sensplan plan`.")
    choices: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for gid, g in prune.items():
        try:
            if g.get("status", "scanned") != "scanned":
                skipped[gid] = str(g.get("reason") or "skipped by the scan")
                continue
            ratio, k, channels = float(g["ratio"]), int(g["n_remove"]), int(g["channels"])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ArtifactError(f"{where}.prune[{gid!r}] is {g!r}, not a version-1 group entry (ratio, n_remove, "
                                f"channels, status); make the plan again with `sensplan plan`.") from None
        what: dict[str, Any] = ({"method": "prune", "setting": {"ratio": ratio, "n_remove": k},
                 "label": f"prune {ratio:.0%} ({k} ch)", "effect": {"removed": k}} if k else
                {"method": None, "setting": {}, "label": "none", "effect": {}})
        choices[f"channels:{gid}"] = {"unit": gid, "axis": "channels", "kind": "group", **what, "channels": channels}
    for layer, q in quantize.items():
        bits = q.get("bits") if isinstance(q, Mapping) else None
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise ArtifactError(f"{where}.quantize[{layer!r}] is {q!r}, not a version-1 entry {{'bits': B}}; make "
                                f"the plan again with `sensplan plan`.")
        choices[f"weight:{layer}"] = {"unit": layer, "axis": "weight", "kind": "layer", **_v1_bits(bits)}
    predicted = dict(alloc.get("predicted") or {})
    if "top1" in predicted:
        predicted["score"] = predicted.pop("top1")
    # version 1 recorded no standard errors: unknown, not zero
    predicted.setdefault("drop_se", None)
    predicted.setdefault("drop_interval", None)
    renamed = {"prune": "channels", "quantize": "weight"}
    unit_drops = {}
    for key, v in (alloc.get("unit_drops") or {}).items():
        kind, _, unit = str(key).partition(":")
        unit_drops[f"{renamed.get(kind, kind)}:{unit}"] = v
    out: dict[str, Any] = {"choices": choices, "skipped": {"prune": skipped} if skipped else {},
                           "predicted": predicted, "unit_drops": unit_drops}
    uni = alloc.get("uniform")
    if isinstance(uni, Mapping):
        ratio, bits = float(uni.get("ratio") or 0.0), int(uni.get("bits") or _V1_FLOAT_BITS)
        parts = [f"prune {ratio:.0%}"] if ratio else []
        parts += [f"int{bits}"] if bits != _V1_FLOAT_BITS else []
        out["uniform"] = {"ratio": ratio, "layer_options": {"weight:uniform": _v1_option_key(bits)},
                          "label": ", ".join(parts) or "no compression"}
    return out


@migration(1, "allocations list each block's choice (choices, keyed AXIS:UNIT) instead of prune/quantize; "
              "top1 became the task's score; task, objective.signal/drop_map and cost_models added")
def _v1_to_v2(obj: dict[str, Any]) -> dict[str, Any]:
    obj["plans"] = {name: _v1_allocation(a, f"plans.{name}") for name, a in (obj.get("plans") or {}).items()}
    scan = obj.get("scan")
    if isinstance(scan, dict) and isinstance(scan.get("baseline"), dict) and "top1" in scan["baseline"]:
        scan["baseline"] = {"score": scan["baseline"]["top1"],
                            **{k: v for k, v in scan["baseline"].items() if k != "top1"}}
    obj.setdefault("task", {"name": "classification", "metric": dict(_V1_METRIC)})
    objective = obj.get("objective")
    if isinstance(objective, dict):
        objective.setdefault("signal", "drop")  # version 1 summed the scanned drops
        objective.setdefault("drop_map", None)
    original: Mapping[str, Any] = obj["original"] if isinstance(obj.get("original"), Mapping) else {}
    obj.setdefault("cost_models", [{"name": "analytic", "metrics": list(original),
                                    "units": {m: u for m, u in _ANALYTIC_UNITS.items() if m in original}}])
    return obj
