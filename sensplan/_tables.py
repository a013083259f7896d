"""Typed views of the artifacts that travel between stages, torch-free: ``Scan`` (scan.json) and
``Metrics`` (an apply result's metrics.json). ``Plan`` lives in :mod:`sensplan.planner`.

Each view validates the file on load with the same checks as ``sensplan validate``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sensplan._artifacts import file_sha256, read_json, write_json
from sensplan._errors import ArtifactError
from sensplan._metric import Metric

_LAYER_INDEX = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer layer a module or unit name is in (``model.layers.3.mlp`` -> 3, GPT-2's
    ``h.3``, ``blocks.3``), or None."""
    found = _LAYER_INDEX.search(f".{name}.")
    return int(found.group(1)) if found else None

SCAN_FORMAT = "sensplan.scan"
SCAN_SCHEMA_VERSION = 2
METRICS_FORMAT = "sensplan.metrics"
METRICS_SCHEMA_VERSION = 2
FRONTIER_FORMAT = "sensplan.frontier"
FRONTIER_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Scan:
    """The scan table (``scan.json``): baseline, units, measured drops, cost structure, provenance.

    Plain data keyed by module FQN; see docs/formats.md for every field.
    """

    data: Mapping[str, Any]
    sha256: str = ""
    path: str = ""

    def section(self, key: str) -> Any:
        return self.data[key]

    @property
    def baseline(self) -> Mapping[str, Any]:
        return self.section("baseline")  # type: ignore[no-any-return]

    @property
    def layers(self) -> Mapping[str, Any]:
        return self.section("layers")  # type: ignore[no-any-return]

    @property
    def groups(self) -> Mapping[str, Any]:
        return self.section("groups")  # type: ignore[no-any-return]

    @property
    def tensors(self) -> Mapping[str, Any]:
        return self.section("tensors")  # type: ignore[no-any-return]

    @property
    def results(self) -> Sequence[Mapping[str, Any]]:
        return self.section("results")  # type: ignore[no-any-return]

    @property
    def methods(self) -> Mapping[str, Any]:
        return self.section("methods")  # type: ignore[no-any-return]

    @property
    def metric(self) -> Metric:
        return Metric.from_dict(self.data["task"]["metric"])

    def scanned_groups(self) -> list[str]:
        return [g for g, v in self.groups.items() if v["status"] == "scanned"]

    def skipped_groups(self) -> dict[str, str]:
        return {g: v["reason"] for g, v in self.groups.items() if v["status"] == "skipped"}

    def skipped(self) -> dict[str, dict[str, str]]:
        """Per method, the units it skipped and why."""
        return {m: dict(v.get("skipped", {})) for m, v in self.methods.items()}

    def results_for(self, unit: str, method: str) -> list[Mapping[str, Any]]:
        return [r for r in self.results if r["unit"] == unit and r["method"] == method]

    def restricted(self, methods: Sequence[str]) -> Scan:
        """The same table with only the results of ``methods`` (to plan with a subset of what was
        scanned, e.g. weight bits alone). Unknown names raise ArtifactError listing the scanned ones."""
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise ArtifactError(f"The scan has no results for {', '.join(unknown)}; it scanned "
                                f"{', '.join(self.methods)}.")
        data = dict(self.data)
        data["methods"] = {k: v for k, v in self.methods.items() if k in methods}
        data["results"] = [r for r in self.results if r["method"] in methods]
        return Scan(data, self.sha256, self.path)

    def save(self, path: str | os.PathLike[str]) -> Scan:
        """Write the file atomically; return the saved view, which carries the file's digest (use it:
        what is made from it then chains to the file)."""
        digest = write_json(path, dict(self.data))
        return Scan(self.data, digest, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scan:
        obj = read_json(path, SCAN_FORMAT, (SCAN_SCHEMA_VERSION,))
        from sensplan._validate import check_scan

        problems = check_scan(obj)
        if problems:
            raise ArtifactError(f"{str(path)!r} is not a valid scan: {problems[0]}"
                                + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else "")
                                + ". Re-run `sensplan scan`, or check it with `sensplan validate`.")
        return cls(obj, file_sha256(path), str(path))




def load_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an apply result's ``metrics.json`` (or the directory holding it), validated."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    obj = read_json(p, METRICS_FORMAT, (METRICS_SCHEMA_VERSION,))
    from sensplan._validate import check_metrics

    problems = check_metrics(obj)
    if problems:
        raise ArtifactError(f"{str(p)!r} is not a valid metrics file: {problems[0]}. Re-run `sensplan apply`.")
    return obj
