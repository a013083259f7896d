"""``--to csv``: one row per decision block, for spreadsheets. Expresses everything the plan says."""

from __future__ import annotations

import csv
import io
import json

from sensplan.planner.export._core import EXPORTERS, Exported, Exporter, ExportRequest

#: the columns, in order (docs/exporters.md describes each)
COLUMNS = ("block", "unit", "axis", "kind", "method", "label", "setting", "predicted_unit_drop", "channels",
           "n_remove", "removed_fraction", "weight_bits", "weight_dtype", "group_size", "zero_point_bits",
           "act_bits", "density", "sparse_format", "restructured", "module", "expert")


@EXPORTERS.register
class CsvExporter(Exporter):
    name = "csv"
    names_modules = False  # sensplan's own unit names, one row each
    description = "one row per block (unit, axis, method, setting, predicted drop, channels, bits) for spreadsheets"
    suffix = ".csv"

    def export(self, request: ExportRequest) -> Exported:
        drops = request.allocation.get("unit_drops") or {}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for block, c in request.choices.items():
            e = c.get("effect") or {}
            channels = c.get("channels")
            removed = e.get("removed")
            w.writerow([
                _text(block), _text(c["unit"]), _text(c["axis"]), c.get("kind", ""), _text(c.get("method") or ""),
                _text(c.get("label", "")),
                json.dumps(c.get("setting") or {}, sort_keys=True, separators=(",", ":")),
                _num(drops.get(block)), _num(channels), _num(removed),
                _num(int(removed) / int(channels) if removed is not None and channels else None),
                _num(e.get("weight_bits")), e.get("weight_dtype", ""), _num(e.get("group_size")),
                _num(e.get("zero_point_bits")), _num(e.get("act_bits")), _num(e.get("density")),
                _text(e.get("sparse_format", "")), "yes" if e.get("structure") else "",
                *map(_text, _module(request, str(c["unit"])))])
        return Exported(buf.getvalue())


def _module(request: ExportRequest, unit: str) -> tuple[str, str]:
    """The unit's module name in the user's model (a Hugging Face model's, without sensplan's
    wrapper prefix) and, for a layer or group of an MoE expert that sensplan split out, the fused
    module that holds it and the expert's index (``...experts.3.down_proj`` -> ``...experts.down_proj``, 3)."""
    name = request.target_name(unit)
    root = request.expert_root(unit)
    if root is None:
        return name, ""
    index, _, tail = unit[len(root):].partition(".")  # root ends with "."; the expert's index follows
    fused = request.target_name(root[:-1])
    return fused + (f".{tail}" if tail else ""), index


def _num(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _text(v: object) -> str:
    """A name as a spreadsheet shows it: one that starts like a formula (``=``, ``+``, ``-``, ``@``,
    a tab or carriage return) is prefixed with ``'``, so opening the file never runs it."""
    s = str(v)
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s
