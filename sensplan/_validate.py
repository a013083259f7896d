"""Check artifacts: their format and version, every unit, and the digest chain scan -> plan -> result.

Used on every load (a malformed file is one clear message, not a KeyError) and by
``sensplan validate FILE...``. Each ``check_*`` returns a list of problems (empty = valid).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

from sensplan._artifacts import file_sha256
from sensplan._effects import merge
from sensplan._effects import to_data as effect_data
from sensplan._plan_format import PLAN_FORMAT, migration_note, read_plan, schema_problems, semantic_problems

_NUM = (int, float)


def _num(v: Any) -> bool:
    return isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(float(v))


def _need(obj: Mapping[str, Any], keys: tuple[str, ...], where: str) -> list[str]:
    return [f"{where} lacks {k!r}" for k in keys if k not in obj]


def _map(v: Any) -> TypeGuard[Mapping[str, Any]]:
    return isinstance(v, Mapping)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


#: optional numbers of a result row: absent, null (the scan writes a non-finite value as null), or
#: a number
_NULLABLE_NUMBERS = ("drop_se", "loss_increase", "score", "loss")


def check_scan(obj: Mapping[str, Any]) -> list[str]:
    """Problems of a scan.json object: every section, unit and result row the planner and the report
    read (empty = valid). A result without a numeric ``drop`` is a problem, not a KeyError later."""
    p = _need(obj, ("task", "baseline", "methods", "layers", "groups", "tensors", "results", "model"),
              "the scan")
    if p:
        return p
    task = obj["task"]
    if not _map(task) or not _map(task.get("metric")) or not isinstance(task["metric"].get("name"), str):
        p.append("task.metric.name is missing (the task's metric: name, higher_is_better, unit)")
    base = obj["baseline"]
    if not _map(base) or not _num(base.get("score")):
        p.append("baseline.score must be a number")
    for key in ("methods", "layers", "groups", "tensors"):
        if not _map(obj[key]):
            p.append(f"{key!r} must be an object keyed by name, not a {type(obj[key]).__name__}")
    if not isinstance(obj["results"], list):
        p.append(f"'results' must be a list of rows, not a {type(obj['results']).__name__}")
    if p:
        return p
    methods, layers, groups = obj["methods"], obj["layers"], obj["groups"]
    for name, m in methods.items():
        if not _map(m):
            p.append(f"methods[{name!r}] is not an object")
    for name, layer in layers.items():
        if not _map(layer) or not _num(layer.get("macs")):
            p.append(f"layers[{name!r}] lacks a numeric 'macs'")
            break
    for gid, g in groups.items():
        if not _map(g) or g.get("status") not in ("scanned", "skipped") or not _count(g.get("channels")):
            p.append(f"groups[{gid!r}] needs 'status' (scanned or skipped) and a channel count")
            break
    for k, t in obj["tensors"].items():
        if not _map(t) or not isinstance(t.get("shape"), list) or not _map(t.get("shrinks")):
            p.append(f"tensors[{k!r}] lacks shape/shrinks")
            break
    for i, r in enumerate(obj["results"]):
        if len(p) > 20:
            break
        where = f"results[{i}]"
        if not _map(r):
            p.append(f"{where} is not an object")
            continue
        for k in ("unit", "method", "axis", "setting", "drop"):
            if r.get(k) is None and not (k == "drop" and r.get("estimated") is True):
                p.append(f"{where} has no {k!r}")  # an estimated row (scan --fast) has no drop
        if r.get("drop") is not None and not _num(r["drop"]):
            p.append(f"{where}.drop is {r['drop']!r}, not a number")
        for k in ("unit", "method", "axis"):
            if r.get(k) is not None and not isinstance(r[k], str):
                p.append(f"{where}.{k} is {r[k]!r}, not a string")
        if r.get("setting") is not None and not _map(r["setting"]):
            p.append(f"{where}.setting is {r['setting']!r}, not an object")
        if "effect" in r and not _map(r["effect"]):
            p.append(f"{where}.effect is {r['effect']!r}, not an object")
        elif "effect" in r:
            try:
                effect_data(r["effect"])
            except (ValueError, TypeError) as e:
                p.append(f"{where}.effect is not a cost effect sensplan can price: {e}")
        if "level" in r and not _num(r["level"]):
            p.append(f"{where}.level is {r['level']!r}, not a number")
        for k in _NULLABLE_NUMBERS:
            if r.get(k) is not None and not _num(r[k]):
                p.append(f"{where}.{k} is {r[k]!r}, not a number")
        if isinstance(r.get("method"), str) and r["method"] not in methods:
            p.append(f"{where} uses method {r['method']!r}, which the scan's methods section lacks")
        unit = r.get("unit")
        if isinstance(unit, str) and unit not in layers and unit not in groups:
            p.append(f"{where} names unit {unit!r}, which is neither a layer nor a group of the scan")
    return p


def check_plan(obj: Mapping[str, Any]) -> list[str]:
    """Problems of a plan.json object at the current schema_version (empty = valid): each way it
    breaks the published schema (``sensplan/schemas/plan.schema.json``, one line with its JSON
    path), then what the schema cannot say (see ``_plan_format.semantic_problems``). Migrate an
    older plan first (``migrate_plan``)."""
    return schema_problems(obj) or semantic_problems(obj)


def check_metrics(obj: Mapping[str, Any]) -> list[str]:
    """Problems of an apply result's metrics.json object (empty = valid)."""
    p = _need(obj, ("before", "after", "predicted", "plan", "variant"), "the metrics")
    if p:
        return p
    for key in ("before", "after"):
        if not _map(obj[key]) or not _num(obj[key].get("score")):
            p.append(f"{key}.score must be a number")
    for key in ("predicted", "plan"):
        if not _map(obj[key]):
            p.append(f"{key!r} must be an object, not {obj[key]!r}"[:200])
    if "budgets" in obj and not (isinstance(obj["budgets"], list)
                                 and all(_map(b) for b in obj["budgets"])):
        p.append("'budgets' must be a list of objects")
    return p


_CHECKS = {"sensplan.scan": check_scan, "sensplan.plan": check_plan, "sensplan.metrics": check_metrics}


def validate_files(paths: list[str], notes: list[str] | None = None) -> list[str]:
    """Check each file and the digest chain between them; return messages (empty = all valid).

    The chain: a plan records the sha256 of the scan it was made from, a result (metrics.json)
    records the sha256 of the plan it applied. Files given together must chain. A plan of an older
    schema_version is checked as migrated in memory; ``notes`` (when given) gets a line
    ``PATH: note: ...`` saying so.
    """
    from sensplan._artifacts import read_json

    problems: list[str] = []
    loaded: dict[str, list[tuple[str, dict[str, Any], str]]] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and (path / "metrics.json").is_file():
            path = path / "metrics.json"
        if path.suffix == ".sensplan":
            problems += _check_container(path)
            continue
        try:
            head = json.loads(path.read_text())
            fmt = head.get("format") if isinstance(head, dict) else None
        except (OSError, ValueError) as e:
            problems.append(f"{raw}: cannot be read as JSON ({e})")
            continue
        if fmt not in _CHECKS and fmt not in _LOADERS:
            problems.append(f"{raw}: unknown format {fmt!r} (expected one of {', '.join([*_CHECKS, *_LOADERS])})")
            continue
        if fmt in _LOADERS:  # checked by the planner's own reader (imported lazily: no torch)
            import importlib

            module, name = _LOADERS[fmt]
            try:
                loaded_obj = getattr(importlib.import_module(module), name).load(path)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                problems.append(f"{raw}: {e}")
                continue
            if fmt == "sensplan.frontier":
                problems += [f"{raw}: {m}" for m in _frontier_plans(path, loaded_obj.data)]
            continue
        try:
            if fmt == PLAN_FORMAT:
                obj = read_plan(path)
                note = migration_note(obj)
                if note and notes is not None:
                    notes.append(f"{raw}: note: {note}")
            else:
                obj = read_json(path, fmt, (2,) if fmt != "sensplan.metrics" else (1, 2))
        except Exception as e:  # noqa: BLE001 - reported, not raised
            problems.append(f"{raw}: {e}")
            continue
        problems += [f"{raw}: {m}" for m in _CHECKS[fmt](obj)]
        loaded.setdefault(fmt, []).append((str(raw), obj, file_sha256(path)))
    problems += chain_problems(loaded)
    scans = {sha: obj for _, obj, sha in loaded.get("sensplan.scan", [])}
    for path_, obj, _ in loaded.get("sensplan.plan", []):
        scan_obj = scans.get(str((obj.get("scan") or {}).get("sha256")))
        if scan_obj is not None and not problems:
            problems += [f"{path_}: {m}" for m in plan_against_scan(scan_obj, obj)]
    return problems


def write_migrated(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """Write the plan ``src`` migrated to the current schema_version to ``out`` (``src`` is never
    rewritten); return a line saying what was done. Raises :class:`UserInputError` when ``src`` is
    not a valid plan or ``out`` is ``src``."""
    from sensplan._artifacts import write_json
    from sensplan._errors import ArtifactError, UserInputError

    if Path(out).exists() and Path(out).resolve() == Path(src).resolve():
        raise UserInputError(f"--migrate {out} is the plan itself; sensplan never rewrites the plan it reads. "
                             f"Name another file, e.g. --migrate {Path(out).with_suffix('')}_v2.json.")
    obj = read_plan(src)
    problems = check_plan(obj)
    if problems:
        raise ArtifactError(f"{str(src)!r} is not a valid plan once migrated: {problems[0]}. Make the plan "
                            f"again with `sensplan plan`.")
    write_json(out, obj)
    m = obj.get("migrated")
    was = f"schema_version {m['from']}, migrated" if isinstance(m, Mapping) else "already current, copied"
    return f"wrote {out}: {src} ({was}) as plan.json schema_version {obj['schema_version']}"


#: formats read by the planner's classes: a cost table (``sensplan profile``'s, or one by hand) and a
#: frontier (``sensplan frontier``)
_LOADERS = {"sensplan.cost_table": ("sensplan.planner", "TableCosts"),
            "sensplan.frontier": ("sensplan.planner", "Frontier")}


def _frontier_plans(path: Path, data: Mapping[str, Any]) -> list[str]:
    """Every point's plan file exists beside the frontier and has the sha256 it records."""
    out = []
    for point in data.get("points") or ():
        rec = point.get("plan") or {}
        plan_path = path.parent / str(rec.get("path", ""))
        if not rec.get("path") or not plan_path.is_file():
            out.append(f"point {point.get('index')}'s plan {rec.get('path')!r} is missing")
        elif rec.get("sha256") and file_sha256(plan_path) != rec["sha256"]:
            out.append(f"point {point.get('index')}'s plan {rec.get('path')!r} changed since the frontier was made")
    return out


def plan_against_scan(scan: Mapping[str, Any], plan: Mapping[str, Any]) -> list[str]:
    """A plan checked against the scan it was made from: every chosen option is one the scan
    measured (a group's fraction off the scanned grid excepted, as the uniform plan writes it), and
    its predicted size, MACs, BOPs and parameters are what the scan's costs give for its choices. A
    plan edited by hand (a setting changed, an option added) fails here with the difference."""
    from sensplan._tables import Scan
    from sensplan.planner import AnalyticCosts, option_key

    table = Scan(scan)
    scanned = {(r["axis"], r["unit"], option_key(r["method"], r["setting"])) for r in table.results}
    kinds = {name: info.get("unit_kind", "layer") for name, info in table.methods.items()}
    out = []
    analytic = AnalyticCosts(table)
    for variant, alloc in (plan.get("plans") or {}).items():
        if not alloc:
            continue
        removed: dict[str, float] = {}
        per_layer: dict[str, list[Mapping[str, Any]]] = {}
        for name, c in alloc["choices"].items():
            if not c.get("method"):
                continue
            key = option_key(c["method"], c.get("setting", {}))
            if kinds.get(c["method"]) == "group":
                removed[c["unit"]] = float((c.get("effect") or {}).get("removed", 0))
            elif (c["axis"], c["unit"], key) not in scanned:
                out.append(f"plans.{variant} chooses {key} for {name}, which the scan did not measure "
                           f"(an edited plan? make it again with `sensplan plan`)")
                continue
            else:
                per_layer.setdefault(c["unit"], []).append(c.get("effect") or {})
        if out:
            continue
        try:
            costs = analytic.direct(removed, {u: merge(e) for u, e in per_layer.items()})
        except ValueError as e:
            out.append(f"plans.{variant} cannot be priced: {e}")
            continue
        predicted = alloc.get("predicted") or {}
        for metric, value in costs.items():
            want = predicted.get(metric)
            if isinstance(want, (int, float)) and abs(float(want) - value) > 1e-6 * max(1.0, abs(value)):
                out.append(f"plans.{variant} predicts {metric} {float(want):.6g}, but its choices cost {value:.6g} "
                           f"by the scan (an edited plan? make it again with `sensplan plan`)")
    return out


def chain_problems(loaded: Mapping[str, list[tuple[str, dict[str, Any], str]]]) -> list[str]:
    """Digest-chain problems among loaded artifacts (format -> [(path, obj, sha256)])."""
    out = []
    scans = {sha: path for path, _, sha in loaded.get("sensplan.scan", [])}
    plans = {sha: path for path, _, sha in loaded.get("sensplan.plan", [])}
    for path, obj, _ in loaded.get("sensplan.plan", []):
        want = (obj.get("scan") or {}).get("sha256")
        if scans and want not in scans:
            out.append(f"{path}: was made from a scan with sha256 {str(want)[:16]}, not from "
                       f"{', '.join(scans.values())} (digest chain broken)")
    for path, obj, _ in loaded.get("sensplan.metrics", []):
        want = (obj.get("plan") or {}).get("sha256")
        if plans and want not in plans:
            out.append(f"{path}: applied a plan with sha256 {str(want)[:16]}, not "
                       f"{', '.join(plans.values())} (digest chain broken)")
    return out


def _check_container(path: Path) -> list[str]:
    if not path.is_file():
        return [f"{path}: does not exist"]
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic != b"SENSPLAN":
        return [f"{path}: not a sensplan compressed model (bad magic bytes)"]
    return []


def file_exists(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_file()
