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
from typing import Any

from sensplan._artifacts import file_sha256

_NUM = (int, float)


def _num(v: Any) -> bool:
    return isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(float(v))


def _need(obj: Mapping[str, Any], keys: tuple[str, ...], where: str) -> list[str]:
    return [f"{where} lacks {k!r}" for k in keys if k not in obj]


def check_scan(obj: Mapping[str, Any]) -> list[str]:
    p = _need(obj, ("task", "baseline", "methods", "layers", "groups", "tensors", "results", "model"),
              "the scan")
    if p:
        return p
    base = obj["baseline"]
    if not isinstance(base, Mapping) or not _num(base.get("score")):
        p.append("baseline.score must be a number")
    methods = obj["methods"]
    for i, r in enumerate(obj["results"]):
        where = f"results[{i}]"
        if not isinstance(r, Mapping):
            p.append(f"{where} is not an object")
            continue
        for k in ("unit", "method", "axis", "setting", "drop"):
            if r.get(k) is None:
                p.append(f"{where} has no {k!r}")
        if r.get("drop") is not None and not _num(r["drop"]):
            p.append(f"{where}.drop is {r['drop']!r}, not a number")
        if r.get("method") is not None and r["method"] not in methods:
            p.append(f"{where} uses method {r['method']!r}, which the scan's methods section lacks")
        unit = r.get("unit")
        if unit is not None and unit not in obj["layers"] and unit not in obj["groups"]:
            p.append(f"{where} names unit {unit!r}, which is neither a layer nor a group of the scan")
        if len(p) > 20:
            break
    for k, t in obj["tensors"].items():
        if not isinstance(t, Mapping) or "shape" not in t or "shrinks" not in t:
            p.append(f"tensors[{k!r}] lacks shape/shrinks")
            break
    return p


def check_plan(obj: Mapping[str, Any]) -> list[str]:
    p = _need(obj, ("plans", "original", "scan", "model", "task", "objective"), "the plan")
    if p:
        return p
    for name, v in obj["plans"].items():
        if v is None:
            continue
        for k in ("choices", "predicted"):
            if k not in v:
                p.append(f"the {name!r} allocation lacks {k!r}")
        for block, c in v.get("choices", {}).items():
            if not isinstance(c, Mapping) or "unit" not in c or "method" not in c:
                p.append(f"the {name!r} allocation's choice {block!r} lacks unit/method")
                break
    return p


def check_metrics(obj: Mapping[str, Any]) -> list[str]:
    return _need(obj, ("before", "after", "predicted", "plan", "variant"), "the metrics")


_CHECKS = {"sensplan.scan": check_scan, "sensplan.plan": check_plan, "sensplan.metrics": check_metrics}


def validate_files(paths: list[str]) -> list[str]:
    """Check each file and the digest chain between them; return messages (empty = all valid).

    The chain: a plan records the sha256 of the scan it was made from, a result (metrics.json)
    records the sha256 of the plan it applied. Files given together must chain.
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
        if fmt not in _CHECKS and fmt != "sensplan.cost_table":
            problems.append(f"{raw}: unknown format {fmt!r} (expected one of {', '.join(_CHECKS)})")
            continue
        if fmt == "sensplan.cost_table":
            from sensplan.planner import TableCosts

            try:
                TableCosts.load(path)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                problems.append(f"{raw}: {e}")
            continue
        try:
            obj = read_json(path, fmt, (2,) if fmt != "sensplan.metrics" else (1, 2))
        except Exception as e:  # noqa: BLE001 - reported, not raised
            problems.append(f"{raw}: {e}")
            continue
        problems += [f"{raw}: {m}" for m in _CHECKS[fmt](obj)]
        loaded.setdefault(fmt, []).append((str(raw), obj, file_sha256(path)))
    problems += chain_problems(loaded)
    return problems


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
