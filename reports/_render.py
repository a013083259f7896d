"""Render ``report.html`` (self-contained, opens offline) and PNG charts from the artifacts alone.

Reads ``scan.json``, optionally ``plan.json``, an ``apply`` result directory (``metrics.json``
and ``uniform/metrics.json``) and a ``frontier.json`` (``sensplan frontier``). Never loads a model
and never imports torch: everything comes from the torch-free artifact views
(:mod:`sensplan._tables`, :mod:`sensplan.planner`). Methods, axes and settings are shown
generically, as the artifacts describe them; nothing here depends on a method's name. Every
string taken from the model or the artifacts is HTML-escaped. Percentages appear only here; the
artifacts hold fractions. A drop is positive when the model got worse.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen on these machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sensplan._artifacts import atomic_write, atomic_write_bytes, dumps  # noqa: E402
from sensplan._errors import ArtifactError, UserInputError  # noqa: E402
from sensplan._metric import FISHER, Metric  # noqa: E402
from sensplan._tables import Scan, layer_index, load_metrics  # noqa: E402
from sensplan.planner import DropMap, Frontier, Plan, plot_frontier, runtime_options  # noqa: E402
from sensplan.reports._interactive import CSS, SCRIPT, chart, heatmap, table  # noqa: E402
from sensplan.reports._verdict import Verdict, verdict  # noqa: E402

FIGURES = ("sensitivity_heatmap", "drop_curves", "allocation", "layer_grid", "verification", "before_after")
"""The PNG files written beside ``report.html`` (``allocation`` only with a plan, ``verification``
only with a verified plan; ``frontier.png`` too, given a frontier). The first two
hold one panel per scanned method, ``allocation`` one panel per axis."""

VARIANTS = ("planned", "uniform")
_DASH = "–"
_Matrix = npt.NDArray[np.float64]


# -- the task's metric, shown in its own words -------------------------------------------------
@dataclass(frozen=True)
class _Fmt:
    """How the report writes the task's metric: a fraction as percent (scores) and points (drops);
    any other unit as is. ``title`` is the metric's name for headings ("top1" -> "top-1")."""

    metric: Metric

    @property
    def title(self) -> str:
        return re.sub(r"(?<=[A-Za-z])(?=\d)", "-", self.metric.name).replace("_", " ")

    @property
    def percent(self) -> bool:
        return self.metric.unit == "fraction"

    @property
    def factor(self) -> float:
        return 100.0 if self.percent else 1.0

    @property
    def drop_unit(self) -> str:
        return "points" if self.percent else (self.metric.unit or "score units")

    def score(self, x: Any) -> str:
        return self.metric.format_score(float(x)) if _isnum(x) else _DASH

    def drop(self, x: Any, se: Any = None) -> str:
        if not _isnum(x):
            return _DASH
        out = f"{self.factor * float(x):.2f}" if self.percent else f"{float(x):.4g}"
        if _isnum(se) and float(se) > 0:
            out += f" ± {self.factor * float(se):.2f}" if self.percent else f" ± {float(se):.2g}"
        return out


def _tight(fig: Figure) -> None:
    """``fig.tight_layout()``, without matplotlib's warning where a chart's labels leave no room (the
    chart is drawn as it is; the warning would reach the user's terminal)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Tt]ight.?layout", category=UserWarning)
        fig.tight_layout()


def _isnum(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _si(x: Any, unit: str = "") -> str:
    """``70208`` -> ``70.2 k``; ``9640, "B"`` -> ``9.64 kB``."""
    if not _isnum(x):
        return _DASH
    v = float(x)
    for f, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= f:
            return f"{v / f:.3g} {p}{unit}"
    return f"{v:.4g} {unit}".strip()


def _cost(metric: str, x: Any, units: Mapping[str, str]) -> str:
    unit = units.get(metric, "")
    if unit == "bytes":
        return _si(x, "B")
    if unit in ("", "count", "per sample"):
        return _si(x)
    return f"{float(x):.4g} {unit}" if _isnum(x) else _DASH


def _cost_units(plan: Plan | None) -> dict[str, str]:
    """Metric -> unit, from the cost models the plan records (analytic: a dict; a table: one)."""
    out: dict[str, str] = {}
    for cm in (plan.data.get("cost_models") or []) if plan is not None else []:
        units = cm.get("units")
        if isinstance(units, Mapping):
            out.update({str(k): str(v) for k, v in units.items()})
        for m in cm.get("metrics", []):
            if isinstance(cm.get("unit"), str):
                out.setdefault(str(m), cm["unit"])
    return out


def _tx(s: Any) -> str:
    """Text for a figure: a ``$`` in a module name must not start matplotlib's mathtext."""
    return str(s).replace("$", r"\$")


def _setting_text(setting: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in setting.items())


# -- the scan, per method: units x settings -----------------------------------------------------
@dataclass(frozen=True)
class _Sensitivity:
    """One method's scan results as a matrix: ``drops[i, j]`` is the drop (a fraction of the metric,
    NaN where not probed) of ``units[i]`` at ``columns[j]``; columns ordered by ``level``."""

    method: str
    info: Mapping[str, Any]
    units: list[str]
    columns: list[str]
    drops: _Matrix
    levels: dict[str, dict[str, float]]  # unit -> label -> level: how strong each probe was
    ses: _Matrix  # the drops' paired standard errors (NaN where none)


def _column_of(setting: Mapping[str, Any], declared: Sequence[Mapping[str, Any]]) -> str:
    """The declared setting a probe's (possibly refined) setting comes from, as a key."""
    for i, d in enumerate(declared):
        if all(setting.get(k) == v for k, v in d.items()):
            return f"#{i}"
    return json.dumps(dict(setting), sort_keys=True, default=str)


def _column_label(labels: Iterable[str], fallback: str) -> str:
    """One label for a column: the probes' label, or what the labels share ("prune 25% (4 ch)" and
    "prune 25% (2 ch)" -> "prune 25%"), else the declared setting."""
    uniq = sorted(set(labels))
    if len(uniq) == 1:
        return uniq[0]
    prefix = os.path.commonprefix(uniq)
    if prefix and prefix[-1].isalnum() and any(len(u) > len(prefix) and u[len(prefix)].isalnum() for u in uniq):
        prefix = re.sub(r"[\w.%]+$", "", prefix)  # "prune 30% (1" of "(10 ch)" and "(19 ch)": not a word
    prefix = prefix.rstrip(" ([{=:,;")
    return prefix if len(prefix) >= 2 else fallback


def _mean_level(rows: Iterable[Mapping[str, Any]]) -> float:
    lv = [float(r["level"]) for r in rows if _isnum(r.get("level"))]
    return sum(lv) / len(lv) if lv else 0.0


def _column_order(cols: Mapping[str, Sequence[Mapping[str, Any]]], n_declared: int) -> list[str]:
    """Columns from weaker to stronger: by the mean ``level`` of the units probed in every column
    (a level, such as channels removed, compares only within one unit), else in declared order
    (the scanner sorts a method's settings by level)."""

    def declared(k: str) -> int:
        return int(k[1:]) if k.startswith("#") else n_declared

    common = set.intersection(*({str(r["unit"]) for r in v} for v in cols.values()))
    if common:
        return sorted(cols, key=lambda k: (
            _mean_level(r for r in cols[k] if str(r["unit"]) in common), declared(k)))
    return sorted(cols, key=lambda k: (declared(k), _mean_level(cols[k])))


def display_names(scan: Scan) -> dict[str, str]:
    """Group id -> the name the report shows for the group: a transformer's head or MLP group by its
    label ("layer 3 heads"). A group's id is one of its layers' names, and a layer method's unit of
    that name is the single layer: apply these to group units only (see :func:`names_of`)."""
    return {gid: str(g["label"]) for gid, g in (scan.data.get("groups") or {}).items() if g.get("label")}


def names_of(names: Mapping[str, str], info: Mapping[str, Any] | None) -> Mapping[str, str]:
    """``names`` (group labels) for the units of a method described by ``info`` when it works on
    groups; none for a method on single layers, whose units keep their own names."""
    return names if (info or {}).get("unit_kind") == "group" else {}


def group_axes(methods: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The axes of the group methods among ``methods`` (method -> its scan info)."""
    return {str(i.get("axis")) for i in methods.values() if i.get("unit_kind") == "group"}


def sensitivities(scan: Scan) -> list[_Sensitivity]:
    """Per scanned method (in the scan's order), its results as a units x settings matrix."""
    out = []
    for method, info in scan.methods.items():
        rows = [r for r in scan.results if r.get("method") == method]
        if not rows:
            continue
        declared = list(info.get("settings") or [])
        cols: dict[str, list[Mapping[str, Any]]] = {}
        for r in rows:
            cols.setdefault(_column_of(r.get("setting") or {}, declared), []).append(r)

        keys = _column_order(cols, len(declared))
        labels: list[str] = []
        for k in keys:
            fallback = _setting_text(declared[int(k[1:])]) if k.startswith("#") else k
            label = _column_label((str(r.get("label") or fallback) for r in cols[k]), fallback)
            labels.append(label if label not in labels else f"{label} ({fallback})")
        units = list(dict.fromkeys(str(r["unit"]) for r in rows))
        m = np.full((len(units), len(keys)), np.nan)
        se = np.full((len(units), len(keys)), np.nan)
        levels: dict[str, dict[str, float]] = {}
        for j, k in enumerate(keys):
            for r in cols[k]:
                if _isnum(r.get("drop")):
                    m[units.index(str(r["unit"])), j] = float(r["drop"])
                if _isnum(r.get("drop_se")):
                    se[units.index(str(r["unit"])), j] = float(r["drop_se"])
                lv = float(r["level"]) if _isnum(r.get("level")) else float(j)
                levels.setdefault(str(r["unit"]), {})[str(r.get("label", ""))] = lv
        out.append(_Sensitivity(method, info, units, labels, m, levels, se))
    return out


# -- figures -----------------------------------------------------------------------------------
def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    w, h = fig.get_size_inches()
    dpi = max(40, min(110, int(15000 / max(w, h, 1.0))))  # keep a huge model's figure openable
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _empty(text: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.text(0.5, 0.5, _tx(text), ha="center", va="center")
    ax.axis("off")
    return _png(fig)


def fig_heatmap(sens: Sequence[_Sensitivity], fmt: _Fmt, names: Mapping[str, str] | None = None) -> bytes:
    """One panel per method: units x settings, the drop in the metric's points, each panel on its own
    colour scale (its colour bar says which). ``names``: what to show for a unit."""
    names = names or {}
    if not sens:
        return _empty("nothing was scanned")
    heights = [max(1.6, 0.26 * len(s.units) + 1.1) for s in sens]
    width = min(16.0, max(6.0, 3.0 + 1.1 * max(len(s.columns) for s in sens)))
    fig, axes = plt.subplots(len(sens), 1, figsize=(width, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    cmap = plt.get_cmap("magma_r").with_extremes(bad="0.92")
    for ax, s in zip(axes[:, 0], sens, strict=True):
        # a scale per method (as on the page): a 0-3 point map is not washed out by a 0-60 one
        top = float(np.nanmax(s.drops)) if np.isfinite(s.drops).any() else 0.0
        vmax = max(0.01, top) * fmt.factor
        v = s.drops * fmt.factor
        im = ax.imshow(np.ma.masked_invalid(np.clip(v, 0, None)), aspect="auto", cmap=cmap, vmin=0,
                       vmax=vmax)
        shown_names = names_of(names, s.info)
        ax.set_yticks(range(len(s.units)), [_tx(shown_names.get(u, u)) for u in s.units], fontsize=7)
        ax.set_xticks(range(len(s.columns)), [_tx(c) for c in s.columns], fontsize=7,
                      rotation=20 if max(len(c) for c in s.columns) > 8 else 0, ha="right"
                      if max(len(c) for c in s.columns) > 8 else "center")
        ax.set_title(_tx(f"{s.method} ({s.info.get('axis', '?')}): {fmt.title} drop per "
                         f"{s.info.get('unit_kind', 'unit')} ({fmt.drop_unit})"), fontsize=9)
        if v.size <= 600:
            for i in range(len(s.units)):
                for j in range(len(s.columns)):
                    x = v[i, j]
                    ax.text(j, i, _DASH if np.isnan(x) else f"{x:.1f}" if fmt.percent else f"{x:.2g}",
                            ha="center", va="center",
                            fontsize=6, color="white" if x > 0.6 * vmax else "black")
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    _tight(fig)
    return _png(fig)


def fig_curves(sens: Sequence[_Sensitivity], fmt: _Fmt, highlight: int = 6) -> bytes:
    """One panel per method: the drop of every unit against its settings, ordered by strength; the
    ``highlight`` most sensitive units in colour."""
    sens = [s for s in sens if len(s.columns) > 1]  # one setting is a point, not a curve
    if not sens:
        return _empty("no method was scanned at two settings or more")
    ncols = min(3, len(sens))
    nrows = math.ceil(len(sens) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[len(sens):]:
        ax.axis("off")
    for ax, s in zip(axes.flat, sens, strict=False):
        v = s.drops * fmt.factor
        worst = np.nan_to_num(np.nanmax(np.where(np.isnan(v), -np.inf, v), axis=1), neginf=0.0)
        top = set(np.argsort(-worst, kind="stable")[:highlight].tolist())
        xs = np.arange(len(s.columns))
        for i, u in enumerate(s.units):
            ok = ~np.isnan(v[i])
            if i in top:
                ax.plot(xs[ok], v[i][ok], marker="o", ms=3, lw=1.4, label=_tx(u))
            else:
                ax.plot(xs[ok], v[i][ok], color="0.72", lw=0.8, marker="." if ok.sum() == 1 else "")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(xs, [_tx(c) for c in s.columns], fontsize=7, rotation=20, ha="right")
        ax.set_xlabel("setting (weaker → stronger)", fontsize=8)
        ax.set_ylabel(_tx(f"{fmt.title} drop ({fmt.drop_unit})"), fontsize=8)
        ax.set_title(_tx(f"{s.method}: {fmt.title} drop per {s.info.get('unit_kind', 'unit')}"),
                     fontsize=9)
        if len(xs) == 1:
            ax.set_xlim(-0.5, 0.5)
        ax.legend(fontsize=6, title="most sensitive", title_fontsize=7)
    _tight(fig)
    return _png(fig)


def _blocks(plan: Plan) -> dict[str, Mapping[str, Any]]:
    """Every decision block of the plan (planned, then any only the uniform plan lists)."""
    out: dict[str, Mapping[str, Any]] = {}
    for name in VARIANTS:
        alloc = plan.data["plans"].get(name)
        if alloc:
            for b, c in alloc["choices"].items():
                out.setdefault(b, c)
    return out


def _by_axis(plan: Plan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for b, c in _blocks(plan).items():
        out.setdefault(str(c.get("axis") or "?"), []).append(b)
    return out


def _strength(sens: Mapping[str, _Sensitivity], choice: Mapping[str, Any]) -> float:
    """How strong a chosen option is among the unit's scanned options of its method, in (0, 1]
    (0 = nothing applied; 0.6 when the option was not scanned, e.g. an off-grid uniform ratio)."""
    method = choice.get("method")
    if not method:
        return 0.0
    s = sens.get(str(method))
    levels = s.levels.get(str(choice.get("unit")), {}) if s else {}
    label = str(choice.get("label", ""))
    if label not in levels:
        return 0.6
    ranked = sorted(set(levels.values()))
    return 0.3 + 0.7 * (ranked.index(levels[label]) + 1) / len(ranked)


def fig_allocation(plan: Plan, sens: Sequence[_Sensitivity], methods: Sequence[str],
                   names: Mapping[str, str] | None = None) -> bytes:
    """One panel per axis: a row per unit, a column per allocation (planned, uniform), each cell the
    chosen option's label, coloured by method and darker for stronger settings."""
    names = names or {}
    by_axis = _by_axis(plan)
    if not by_axis:
        return _empty("the plan has no decision blocks")
    # an axis no allocation compresses (all-float bits in a MACs plan) is not a chart
    allocs = [a for n in VARIANTS if (a := plan.data["plans"].get(n))]
    used = {axis: blocks for axis, blocks in by_axis.items()
            if any((a["choices"].get(b) or {}).get("method") for a in allocs for b in blocks)}
    by_axis = used or by_axis
    shown = [(n, a) for n in VARIANTS if (a := plan.data["plans"].get(n))]
    every = _blocks(plan)
    palette = plt.get_cmap("tab10")
    color = {m: np.array(palette(i % 10)[:3]) for i, m in enumerate(methods)}
    bysens = {s.method: s for s in sens}
    n_max = max(len(v) for v in by_axis.values())
    fig, axes = plt.subplots(1, len(by_axis), figsize=(4.3 * len(by_axis), 0.27 * n_max + 1.6),
                             squeeze=False)
    for ax, (axis, blocks) in zip(axes[0], by_axis.items(), strict=True):
        img = np.ones((len(blocks), len(shown), 3))
        for i, b in enumerate(blocks):
            for j, (_, a) in enumerate(shown):
                c = a["choices"].get(b)
                if c is None:
                    img[i, j] = 0.85
                    txt = "not listed"
                else:
                    s = _strength(bysens, c)
                    base = color.get(str(c.get("method")), np.array([0.5, 0.5, 0.5]))
                    img[i, j] = 1.0 - s * 0.75 * (1.0 - base) if s else 0.97
                    txt = str(c.get("label") or (c.get("method") or "none"))
                ax.text(j, i, _tx(txt), ha="center", va="center", fontsize=6,
                        color="white" if float(img[i, j].mean()) < 0.45 else "black")
        ax.imshow(img, aspect="auto", interpolation="nearest")
        units = [str(every[b].get("unit", b)) for b in blocks]
        labels = names if axis in group_axes({x.method: x.info for x in sens}) else {}
        ax.set_yticks(range(len(blocks)), [_tx(labels.get(u, u)) for u in units], fontsize=7)
        ax.set_xticks(range(len(shown)), [n for n, _ in shown], fontsize=8)
        ax.xaxis.tick_top()
        ax.set_xticks(np.arange(len(shown) + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(len(blocks) + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", lw=1.5)
        ax.tick_params(which="minor", length=0)
        ax.set_title(_tx(f"axis: {axis}"), fontsize=9, pad=18)
    _tight(fig)
    return _png(fig)


Grid = tuple[list[int], list[str], dict[tuple[int, str], str]]


def layer_grid(plan: Plan, scan: Scan, variant: str = "planned") -> Grid:
    """A transformer's allocation as a layer x unit-kind grid: the layer indices, the kinds (head
    and MLP groups, then each projection by its module name: q_proj, c_attn, ...), and per cell the
    chosen options' labels. Empty when fewer than two units have a layer index."""
    alloc = plan.data["plans"].get(variant) or {}
    groups = scan.data.get("groups") or {}
    cells: dict[tuple[int, str], list[str]] = {}
    for c in (alloc.get("choices") or {}).values():
        unit = str(c.get("unit", ""))
        g = groups.get(unit) if c.get("kind") == "group" else None
        if g is not None and g.get("layer") is not None:
            layer = int(g["layer"])
            kind = "heads" if g.get("kind") == "heads" else f"expert {g['expert']}" if g.get("expert") is not None \
                else "MLP"
        else:
            index = layer_index(unit)
            if index is None:
                continue
            layer, kind = index, unit.rsplit(".", 1)[-1]
            if kind in ("dense",):  # BERT's projections are all "dense": name them by their parent
                kind = ".".join(unit.rsplit(".", 2)[-2:])
            expert = re.search(r"\.experts\.(\d+)\.[^.]+$", unit)  # an MoE expert's projection (see _moe)
            if expert:
                kind = f"expert {expert.group(1)} {kind}"
        label = str(c.get("label") or "") if c.get("method") else ""
        cells.setdefault((layer, kind), [])
        if label:
            cells[(layer, kind)].append(label)
    layers = sorted({k[0] for k in cells})
    if len(layers) < 2:
        return [], [], {}
    kinds = sorted({k[1] for k in cells}, key=lambda k: (k not in ("heads", "MLP"), k != "heads",
                                                         [(0, int(t), "") if t.isdigit() else (1, 0, t)
                                                          for t in k.split()]))
    return layers, kinds, {k: " + ".join(v) or "none" for k, v in cells.items()}


def fig_layer_grid(plan: Plan, scan: Scan) -> bytes | None:
    """The planned allocation of a transformer, one row per layer, one column per unit kind."""
    layers, kinds, cells = layer_grid(plan, scan)
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(min(18.0, 1.5 + 1.25 * len(kinds)), 0.3 * len(layers) + 1.4))
    img = np.ones((len(layers), len(kinds), 3))
    for i, layer in enumerate(layers):
        for j, kind in enumerate(kinds):
            txt = cells.get((layer, kind), "")
            img[i, j] = (0.92, 0.92, 0.92) if not txt else (1.0, 1.0, 1.0) if txt == "none" else (0.80, 0.88, 1.0)
            ax.text(j, i, _tx(txt or _DASH), ha="center", va="center", fontsize=6)
    ax.imshow(img, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [f"layer {x}" for x in layers], fontsize=7)
    ax.set_xticks(range(len(kinds)), [_tx(k) for k in kinds], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_title("planned allocation per layer", fontsize=9, pad=16)
    _tight(fig)
    return _png(fig)


def fig_table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(min(16, 2.8 + 1.9 * (len(headers) - 1)),
                                    0.3 * (len(rows) + 1) + 0.4))
    ax.axis("off")
    t = ax.table(cellText=[[_tx(c) for c in r] for r in rows], colLabels=[_tx(h) for h in headers],
                 loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.auto_set_column_width(list(range(len(headers))))
    t.scale(1, 1.4)
    ax.set_title(_tx(title), fontsize=10)
    return _png(fig)


def fig_verification(plan: Plan, fmt: _Fmt) -> bytes:
    """Predicted against measured drop: the plan's rounds (numbered) and the uniform candidates."""
    ver = plan.data.get("verification") or {}
    rounds = [r for r in ver.get("rounds", []) if "sample" in r]
    unis = ver.get("uniform", [])
    if not rounds and not unis:
        return _empty("no verification")
    f = fmt.factor
    fig, ax = plt.subplots(figsize=(6.4, 4.6))

    def held_or_sample(r: Mapping[str, Any]) -> float:
        return float((r.get("held_out") or r["sample"])["drop"])

    xs = [f * float(r["predicted"]["drop"]) for r in rounds]
    ys = [f * held_or_sample(r) for r in rounds]
    ax.plot(xs, ys, "o-", color="tab:blue", label="plan rounds")
    for r, x, y in zip(rounds, xs, ys, strict=True):
        ax.annotate(str(r["round"]), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        lo, hi = r["predicted"]["drop_interval"]
        ax.plot([f * lo, f * hi], [y, y], color="tab:blue", alpha=0.35, lw=3)
    ux = [f * float(u["predicted"]["drop"]) for u in unis]
    uy = [f * held_or_sample(u) for u in unis]
    ax.scatter(ux, uy, marker="s", color="tab:orange", label="uniform candidates", zorder=3)
    win = (ver.get("winner") or {}).get("name", "")
    points = {f"plan round {r['round']}": (x, y) for r, x, y in zip(rounds, xs, ys, strict=True)}
    points.update({f"uniform {u['label']}": (x, y) for u, x, y in zip(unis, ux, uy, strict=True)})
    if win in points:
        ax.scatter(*points[win], marker="*", s=220, color="black", label="chosen", zorder=4)
    every = xs + ys + ux + uy
    lo_, hi_ = min([0.0, *every]), max([0.0, *every])
    ax.plot([lo_, hi_], [lo_, hi_], color="grey", lw=0.8, ls="--", label="measured = predicted")
    split = "held-out" if any(r.get("held_out") for r in rounds + unis) else "scan sample"
    ax.set_xlabel(f"predicted {fmt.title} drop ({fmt.drop_unit})")
    ax.set_ylabel(f"measured {fmt.title} drop, {split} ({fmt.drop_unit})")
    ax.legend(fontsize=8)
    ax.set_title("verification: predicted vs measured", fontsize=10)
    return _png(fig)


def _verification_section(plan: Plan, fmt: _Fmt, svg: str) -> str:
    ver = plan.data.get("verification")
    if not ver:
        return ("<h2>Verification</h2><p class='muted'>This plan was not verified (planned with "
                "--no-verify): its drop is the scan's additive prediction, unmeasured.</p>" + svg)
    winner = ver.get("winner", {})
    split = ver.get("split", {})
    # uniform winning outright is a finding to see; a close call (within one paired standard error) is not
    cls = ("bad" if winner.get("kind") == "uniform" and not ver.get("within_noise")
           else "tie" if winner.get("kind") == "uniform" else "ok")
    held_n, report_n = split.get("held_out"), split.get("report")
    measured_on = (f"Each planned round was applied as the executor applies it without fine-tuning and "
                   f"measured on the scan's sample ({split.get('sample', '?')} items)"
                   + (f" and on a held-out split ({held_n} items) that the scan never saw; the uniform "
                      f"candidates on the held-out split only, and the joint measurements behind a "
                      f"correction on the scan's sample" if held_n else
                      "; so were the uniform candidates (there was no held-out data)")
                   + f". The final choice was made on the {ver.get('chosen_on')}."
                   + (f" What to expect of it was measured on a report split ({report_n} items) that no "
                      f"correction or choice saw." if report_n else
                      f" What to expect of it was measured on the {ver.get('chosen_on')}, where it was chosen "
                      f"(optimistic).")
                   + f" Verification took {float(ver.get('seconds') or 0):.1f} s.")
    parts = ["<h2>Verification</h2>",
             f"<p class='{cls}'><b>{_e(ver.get('verdict', ''))}</b></p>",
             "<p>" + _e(measured_on) + "</p>"]
    rows = []
    for r in ver.get("rounds", []):
        if "sample" not in r:
            rows.append([f"round {r['round']}", _DASH, _DASH, _DASH, str(r.get("stopped", ""))])
            continue
        lo, hi = r["predicted"]["drop_interval"]
        held = r.get("held_out") or {}
        rows.append([f"round {r['round']}", f"{fmt.drop(r['predicted']['drop'])} "
                     f"[{fmt.drop(lo)}, {fmt.drop(hi)}]",
                     fmt.drop(r["sample"]["drop"], r["sample"].get("drop_se")),
                     fmt.drop(held.get("drop"), held.get("drop_se")),
                     "within the interval" if r.get("within_interval")
                     else "outside: corrected" if "correction" in r else "outside the interval"])
    for u in ver.get("uniform", []):
        held, sample = u.get("held_out") or {}, u.get("sample") or {}
        rows.append([f"uniform {u['label']}", fmt.drop(u["predicted"]["drop"]),
                     fmt.drop(sample.get("drop"), sample.get("drop_se")),
                     fmt.drop(held.get("drop"), held.get("drop_se")), ""])
    parts.append(_table(["candidate", f"predicted drop ({fmt.drop_unit})", "measured, scan sample",
                         "measured, held-out", "note"], rows))
    parts.append(svg)
    return "".join(parts)


def _applied_drop(r: Mapping[str, Any], fmt: _Fmt) -> Any:
    """An applied allocation's measured drop before fine-tuning: what the plan predicts."""
    nf = ((r.get("comparison") or {}).get("drop_without_finetune") or {}).get("measured")
    if _isnum(nf):
        return nf
    b, a = r.get("before") or {}, r.get("after") or {}
    if not r.get("after_without_finetune") and _isnum(b.get("score")) and _isnum(a.get("score")):
        return fmt.metric.drop(float(b["score"]), float(a["score"]))
    return None


def predicted_vs_measured(plan: Plan | None, results: Mapping[str, Mapping[str, Any]], fmt: _Fmt) -> str:
    """Predicted against measured drop, as an SVG: every verification round (held-out, else the scan's
    sample) with its interval, every uniform candidate, the chosen one, and each applied allocation
    (measured before fine-tuning, where apply measured). Empty when nothing was measured."""
    f = fmt.factor
    ver = (plan.data.get("verification") or {}) if plan is not None else {}
    rounds = [r for r in ver.get("rounds", []) if "sample" in r]

    def held_or_sample(r: Mapping[str, Any]) -> tuple[Any, str]:
        m = r.get("held_out") or r.get("sample") or {}
        return m.get("drop"), "held-out" if r.get("held_out") else "scan sample"

    def tip(name: str, pred: Any, meas: Any, where: str) -> str:
        return f"{name}: predicted {fmt.drop(pred)}, measured {fmt.drop(meas)} {fmt.drop_unit} ({where})"

    series: list[dict[str, Any]] = []
    pts: list[dict[str, Any]] = []
    for r in rounds:
        y, where = held_or_sample(r)
        pred = r["predicted"]
        lo, hi = pred.get("drop_interval") or (pred["drop"], pred["drop"])
        pts.append({"x": f * float(pred["drop"]), "y": f * float(y) if _isnum(y) else None, "label": str(r["round"]),
                    "xerr": (f * (lo - pred["drop"]), f * (hi - pred["drop"])),
                    "tip": tip(f"plan round {r['round']}", pred["drop"], y, where)})
    if pts:
        series.append({"name": "plan rounds (95% interval)", "points": pts, "line": True})
    unis: list[dict[str, Any]] = []
    for u in ver.get("uniform", []):
        y, where = held_or_sample(u)
        unis.append({"x": f * float(u["predicted"]["drop"]), "y": f * float(y) if _isnum(y) else None,
                     "tip": tip(f"uniform {u['label']}", u["predicted"]["drop"], y, where)})
    if unis:
        series.append({"name": "uniform candidates", "points": unis, "marker": "square"})
    win = (ver.get("winner") or {}).get("name", "")
    chosen = [p for p, name in [*zip(pts, (f"plan round {r['round']}" for r in rounds), strict=True),
                                *zip(unis, (f"uniform {u['label']}" for u in ver.get("uniform", [])),
                                     strict=True)] if name == win]
    if chosen:
        series.append({"name": "chosen", "points": [{**chosen[0], "label": "", "xerr": None}], "marker": "star",
                       "colour": "#000"})
    for name, r in results.items():
        y = _applied_drop(r, fmt)
        pred = (r.get("predicted") or {}).get("drop")
        if y is not None and pred is not None and _isnum(y) and _isnum(pred):
            series.append({"name": f"{name} as applied", "marker": "star",
                           "points": [{"x": f * float(pred), "y": f * float(y),
                                       "tip": tip(f"{name} as applied, before fine-tuning", pred, y,
                                                  str(r.get("measured_on") or "apply's data"))}]})
    if not any(p.get("y") is not None for s_ in series for p in s_["points"]):
        return ""
    return chart("predicted against measured drop", series, diagonal=True,
                 xlabel=f"predicted {fmt.title} drop ({fmt.drop_unit})",
                 ylabel=f"measured {fmt.title} drop ({fmt.drop_unit})")


# -- the planning signal's map ----------------------------------------------------------------
#: how many x values draw the map on a logarithmic axis (it is piecewise linear in the signal)
_MAP_SAMPLES = 160


def map_probes(scan: Scan, plan: Plan) -> list[Mapping[str, Any]]:
    """The scan's probes the plan's drop map was fitted on (as the planner picks them): every
    measured probe; in a fast scan only the map points, whose signal is the estimate; for a plan
    made for a runtime, of the options it runs. Probes of units the plan left out (a skip, or an
    option the costs could not price) are not counted."""
    signal = str((plan.data.get("objective") or {}).get("signal") or "")
    runtime = str((plan.data.get("runtime") or {}).get("name") or "torch")
    if runtime != "torch":  # planned on the options the runtime runs (plan --runtime)
        scan = runtime_options(scan, runtime)[0]
    fast = any(r.get("estimated") for r in scan.results)
    skipped = (plan.data["plans"].get("planned") or {}).get("skipped") or {}
    return [r for r in scan.results
            if (r.get("map_point") if fast else not r.get("estimated")) and _isnum(r.get("drop"))
            and signal in (r.get("signals") or {}) and r["unit"] not in (skipped.get(r["method"]) or {})]


def _signal_text(scan: Scan, signal: str) -> str:
    if signal == FISHER:
        return "the Fisher estimate of the KL divergence from the original model's outputs (nats)"
    desc = ((scan.data.get("task") or {}).get("signals") or {}).get(signal)
    return f"{signal}, the {desc}" if desc else signal


def _variant_measured(alloc: Mapping[str, Any]) -> tuple[Any, str]:
    """An allocation's drop as verification measured it: held-out, else on the scan's sample."""
    ver = alloc.get("verified") or {}
    for key, where in (("held_out", "held-out"), ("sample", "scan sample")):
        if _isnum((ver.get(key) or {}).get("drop")):
            return ver[key]["drop"], where
    return None, ""


def drop_map_section(scan: Scan, plan: Plan, fmt: _Fmt) -> str:
    """How the plan's predicted drop was obtained when it planned on a signal (not the drop): the
    probes the map was fitted on (signal, measured drop), the map, each allocation's total signal
    with its predicted drop and, where verification measured it, its measured drop; with a caption.
    Empty for a plan made with ``--signal drop``."""
    obj = plan.data.get("objective") or {}
    signal, knots = str(obj.get("signal") or ""), (obj.get("drop_map") or {}).get("knots") or []
    if not signal or signal == "drop" or not knots:
        return ""
    dmap = DropMap(signal, tuple((float(a), float(b)) for a, b in knots))
    f, probes, names = fmt.factor, map_probes(scan, plan), display_names(scan)
    fast = any(r.get("estimated") for r in scan.results)
    xs = [float(r["signals"][signal].get("value") or 0.0) for r in probes]
    positive = [x for x in xs if x > 0]
    log_x = len(positive) >= 2 and max(positive) > 100 * min(positive)
    left_out = len(xs) - len(positive) if log_x else 0

    def sx(v: float) -> str:
        return f"{v:.3g}"

    series: list[dict[str, Any]] = []
    methods = list(scan.methods)
    for m in sorted({str(r["method"]) for r in probes}, key=lambda m: methods.index(m) if m in methods else 99):
        pts = []
        for r, x in zip(probes, xs, strict=True):
            if r["method"] == m:
                label = r.get("label") or _setting_text(r.get("setting") or {})
                pts.append({"x": x, "y": f * float(r["drop"]), "unit": r["unit"],
                            "tip": f"{names_of(names, scan.methods.get(m)).get(r['unit'], r['unit'])} · "
                                   f"{label}: {signal} {sx(x)}, "
                                   f"drop {fmt.drop(r['drop'], r.get('drop_se'))} {fmt.drop_unit}"})
        series.append({"name": f"{m} probes", "points": pts, "cls": "probe"})
    marks: list[dict[str, Any]] = []
    notes: list[str] = []
    unrecorded = 0
    for name in VARIANTS:
        alloc = plan.data["plans"].get(name)
        pred = (alloc or {}).get("predicted") or {}
        if alloc is None or not _isnum(pred.get("drop")):
            continue
        if not _isnum(pred.get("signal_total")):
            unrecorded += 1
            continue
        total, label = float(pred["signal_total"]), _variant_name(plan, name)
        colour = "#000" if name == "planned" else "#888"
        tip = f"{label}: {signal} total {sx(total)}"
        if log_x and total <= 0:
            notes.append(f"The {label} allocation's total is {sx(total)}, off the logarithmic axis.")
            continue
        marks.append({"name": f"{label}: predicted", "marker": "square", "colour": colour, "cls": "variant",
                      "points": [{"x": total, "y": f * float(pred["drop"]),
                                  "tip": f"{tip}, predicted drop {fmt.drop(pred['drop'])} {fmt.drop_unit}"}]})
        drop, where = _variant_measured(alloc or {})
        if drop is not None:
            marks.append({"name": f"{label}: measured, {where}", "marker": "star", "colour": colour,
                          "cls": "variant-measured",
                          "points": [{"x": total, "y": f * float(drop), "link": f * float(pred["drop"]),
                                      "tip": f"{label}: measured drop {fmt.drop(drop)} {fmt.drop_unit} "
                                             f"({where}), predicted {fmt.drop(pred['drop'])}"}]})
    # the map over everything drawn: piecewise linear between its knots, then along the line from
    # the origin to its last knot (as DropMap continues it)
    every = [*xs, *(float(m["points"][0]["x"]) for m in marks), *(k[0] for k in dmap.knots)]
    if log_x:
        lo, hi = min(x for x in every if x > 0), max(every)
        grid = {lo * (hi / lo) ** (k / _MAP_SAMPLES) for k in range(_MAP_SAMPLES + 1)}
        grid |= {k[0] for k in dmap.knots if lo <= k[0] <= hi}
    else:
        grid = {k[0] for k in dmap.knots} | {max(every)}
    line = [{"x": x, "y": f * dmap(x)} for x in sorted(grid)]
    series.append({"name": "drop map (fitted)", "points": line, "line": True, "marker": "none",
                   "colour": "#555", "cls": "map",
                   "tip": f"the drop map: {len(dmap.knots)} knots, then the slope from 0 to the last"})
    svg = chart(f"the drop map: {signal} to {fmt.title} drop", [*series, *marks],
                xlabel=f"{signal} per probe; per allocation, its total",
                ylabel=f"{fmt.title} drop ({fmt.drop_unit})", fmt_x=sx, log_x=log_x)
    what = (f"The plan did not add up the probes' measured {fmt.title} drops, which are too noisy to rank "
            f"settings by; it added up {_signal_text(scan, signal)}. ")
    if fast:
        estimated = sum(1 for r in scan.results if r.get("estimated"))
        what += (f"This is a fast scan: the x values are Fisher estimates, and the map (line) was fitted on "
                 f"the {len(probes)} map points (dots), the probes measured to map the estimate to the drop "
                 f"({estimated} others were only estimated). ")
    else:
        what += f"The map (line) was fitted on the scan's {len(probes)} measured probes (dots). "
    what += (f"It is the non-decreasing curve through 0 closest to them (isotonic regression), continued "
             f"beyond the last probe along the line from the origin. Each allocation's predicted drop is "
             f"read off the map at its total {signal} (square)")
    what += ("; where verification measured it, the star is its measured drop." if any(
        m["cls"] == "variant-measured" for m in marks) else ".")
    if unrecorded:
        what += " This plan does not record its allocations' totals (an older sensplan wrote it): they are not marked."
    if left_out:
        what += (f" The {signal} axis is logarithmic: {left_out} probe(s) with a value of 0 or less are left out "
                 f"(the map counts them at 0).")
    return ("<h2>Drop model</h2>" + svg + "<p>" + _e(what) + "</p>"
            + "".join(f"<p class='muted'>{_e(n)}</p>" for n in notes))


# -- the numbers -------------------------------------------------------------------------------
_BEFORE_KEY = {"size": "payload_bytes"}  # the measured counterpart of a predicted cost, where named


def _comparison_rows(scan: Scan, plan: Plan | None, results: Mapping[str, Mapping[str, Any]],
                     fmt: _Fmt) -> tuple[list[str], list[list[str]]]:
    """Rows: quantities; columns: original, then predicted and measured for each allocation."""
    before = next((r["before"] for r in results.values()), None)
    units = _cost_units(plan)
    original = dict(plan.original) if plan is not None else {}
    costs = list(original) or ["size", "macs", "bops", "params"]
    fine_tuned = any(r.get("after_without_finetune") for r in results.values())
    title = fmt.title
    drop_row = f"{title} drop ({fmt.drop_unit})"
    names = [title, *([f"{title} before fine-tuning"] if fine_tuned else []), drop_row, "loss",
             *costs, "file on disk", "latency p50 / p95"]

    def lat(d: Mapping[str, Any] | None) -> str:
        la = (d or {}).get("latency")
        if not isinstance(la, Mapping) or not _isnum(la.get("p50_ms")):
            return _DASH
        return f"{la['p50_ms']:.2f} / {la.get('p95_ms', float('nan')):.2f} ms"

    def measured_cost(d: Mapping[str, Any] | None, m: str) -> Any:
        return None if d is None else d.get(_BEFORE_KEY.get(m, m))

    cols: list[tuple[str, dict[str, str]]] = []
    base_score = before["score"] if before else scan.baseline.get("score")
    col = {title: fmt.score(base_score), drop_row: fmt.drop(0.0),
           "loss": f"{before['loss']:.4f}" if before and _isnum(before.get("loss")) else
           (f"{scan.baseline['loss']:.4f}" if _isnum(scan.baseline.get("loss")) else _DASH),
           "file on disk": _si(before.get("file_bytes"), "B") if before else _DASH,
           "latency p50 / p95": lat(before)}
    for m in costs:
        v = measured_cost(before, m)
        col[m] = _cost(m, v if _isnum(v) else original.get(m), units)
    cols.append(("original", col))
    for name in VARIANTS:
        alloc = plan.data["plans"].get(name) if plan is not None else None
        res = results.get(name)
        pred = alloc["predicted"] if alloc else (res or {}).get("predicted")
        if pred is None:
            continue
        col = {title: fmt.score(pred.get("score")),
               drop_row: fmt.drop(pred.get("drop"), pred.get("drop_se"))}
        if fine_tuned:
            col[f"{title} before fine-tuning"] = fmt.score(pred.get("score"))
        for m in costs:
            frac = pred.get(f"{m}_fraction")
            col[m] = _cost(m, pred.get(m), units) + (f" ({frac:.3f}×)" if _isnum(frac) else "")
        cols.append((f"{_variant_name(plan, name)} (predicted)", col))
        if res is None:
            continue
        a, b = res["after"], res["before"]
        no_ft = res.get("after_without_finetune")
        comp = res.get("comparison") or {}
        col = {title: fmt.score(a.get("score")),
               "loss": f"{a['loss']:.4f}" if _isnum(a.get("loss")) else _DASH,
               "file on disk": _si(a.get("file_bytes"), "B"), "latency p50 / p95": lat(a)}
        if _isnum(a.get("score")) and _isnum(b.get("score")):
            col[drop_row] = fmt.drop(fmt.metric.drop(b["score"], a["score"]))
        if fine_tuned:
            col[f"{title} before fine-tuning"] = fmt.score(no_ft.get("score")) if no_ft else _DASH
        for m in costs:
            v = (comp.get(m) or {}).get("measured", measured_cost(a, m))
            o = measured_cost(b, m) if _isnum(measured_cost(b, m)) else original.get(m)
            ratio = f" ({v / o:.3f}×)" if _isnum(v) and _isnum(o) and o else ""
            col[m] = _cost(m, v, units) + ratio
        cols.append((f"{_variant_name(plan, name)} (measured)", col))
    rows = [[n] + [c.get(n, _DASH) for _, c in cols] for n in names]
    return ["quantity", *[h for h, _ in cols]], rows


def _variant_name(plan: Plan | None, name: str) -> str:
    """``uniform prune 30%``: the uniform allocation by its label (the one chosen by prediction at
    the budget; verification may have measured other uniform candidates)."""
    alloc = plan.data["plans"].get(name) if plan is not None else None
    label = ((alloc or {}).get("uniform") or {}).get("label") if name == "uniform" else None
    return f"uniform {label}" if label and not str(label).startswith("uniform") else name


def _budget_rows(plan: Plan | None, results: Mapping[str, Mapping[str, Any]],
                 units: Mapping[str, str]) -> list[list[str]]:
    """One line per (budget, allocation): the limit, predicted and measured cost, met / MISSED."""
    if plan is None:
        return []
    rows = []
    for b in plan.data["objective"].get("budgets") or []:
        metric = str(b.get("metric"))
        absolute = _cost(metric, b.get("absolute"), units)
        limit = (f"{metric} ≤ {b['fraction']:.3f} × original ({absolute})"
                 if _isnum(b.get("fraction")) else f"{metric} ≤ {absolute}")
        for name in VARIANTS:
            alloc = plan.data["plans"].get(name)
            if alloc is None:
                continue
            pv = alloc["predicted"].get(metric)
            pred = _cost(metric, pv, units)
            res = results.get(name)
            line = next((x for x in (res or {}).get("budgets") or [] if x.get("metric") == metric),
                        None)
            if res is None:
                meas, status = _DASH, "not applied"
            elif line is None:
                meas, status = _DASH, "not recorded"
            else:
                meas = _cost(metric, line.get("measured"), units)
                met = line.get("met")
                status = ("met" if met else "MISSED") if met is not None else (
                    "not measured" + (f" ({line['note']})" if line.get("note") else ""))
            pred_ok = _isnum(pv) and _isnum(b.get("absolute")) and pv <= b["absolute"] * (1 + 1e-6)
            rows.append([limit, name, pred + (" ✓" if pred_ok else " ✗"), meas, status])
    return rows


def _comparisons(res: Mapping[str, Any], fmt: _Fmt, units: Mapping[str, str]) -> list[list[str]]:
    rows = []
    for k, v in (res.get("comparison") or {}).items():
        if not isinstance(v, Mapping):
            continue
        if k.startswith("drop"):
            rows.append([f"{fmt.title} {k.replace('_', ' ')} ({fmt.drop_unit})",
                         fmt.drop(v.get("predicted"), (res.get("predicted") or {}).get("drop_se")),
                         fmt.drop(v.get("measured")), _DASH])
        else:
            r = v.get("ratio")
            rows.append([k, _cost(k, v.get("predicted"), units), _cost(k, v.get("measured"), units),
                         f"{r:.4f}" if _isnum(r) else _DASH])
    return rows


# -- digests and inputs ------------------------------------------------------------------------
def _digest(obj: Scan | Plan) -> str:
    """The sha256 of the artifact's file, or of the bytes it would be saved as when in memory."""
    return obj.sha256 or hashlib.sha256(dumps(dict(obj.data)).encode()).hexdigest()


def _where(obj: Scan | Plan, what: str) -> str:
    return f"{what} {obj.path!r}" if obj.path else f"the in-memory {what}"


def _short(sha: Any) -> str:
    return f"{str(sha)[:12]}…" if sha else "none"


def chain_problems(scan: Scan, plan: Plan | None, results: Mapping[str, Mapping[str, Any]],
                   paths: Mapping[str, str]) -> list[str]:
    """Where the digest chain scan -> plan -> metrics is broken (empty = every link holds).

    A plan records the sha256 of its scan file and a metrics.json the sha256 of its plan file. A
    link between two unsaved (in-memory) objects has nothing to compare and is accepted.
    """
    out = []
    if plan is not None:
        want = (plan.data.get("scan") or {}).get("sha256")
        unsaved = not scan.sha256 and not scan.path
        if (want or not unsaved) and want != _digest(scan):
            out.append(f"{_where(plan, 'plan')} was made from a scan with sha256 {_short(want)}, "
                       f"but {_where(scan, 'scan')} has sha256 {_short(_digest(scan))}")
        for name, res in results.items():
            want = (res.get("plan") or {}).get("sha256")
            unsaved = not plan.sha256 and not plan.path
            if (want or not unsaved) and want != _digest(plan):
                out.append(f"the {name} result {paths.get(name, '?')!r} applied a plan with sha256 "
                           f"{_short(want)}, but {_where(plan, 'plan')} has sha256 "
                           f"{_short(_digest(plan))}")
    return out


def _load_results(result: str | os.PathLike[str] | None) -> tuple[dict[str, dict[str, Any]],
                                                                  dict[str, str]]:
    """Variant -> metrics, and variant -> the metrics file, from an apply output directory (its
    ``metrics.json`` and those of its sub-directories) or one metrics.json."""
    if result is None:
        return {}, {}
    root = Path(result)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = [root / "metrics.json"] + [p / "metrics.json" for p in sorted(root.iterdir())
                                           if p.is_dir()]
        files = [f for f in files if f.is_file()]
    else:
        raise ArtifactError(f"The result directory {str(root)!r} does not exist. Pass the --out of "
                            f"`sensplan apply`.")
    if not files:
        raise ArtifactError(f"{str(root)!r} holds no metrics.json. Pass the --out of "
                            f"`sensplan apply`.")
    out: dict[str, dict[str, Any]] = {}
    paths: dict[str, str] = {}
    for f in files:
        m = load_metrics(f)
        variant = str(m["variant"])
        if variant in out:
            raise ArtifactError(f"{str(root)!r} holds two results for the {variant} allocation "
                                f"({paths[variant]!r} and {str(f)!r}). Pass one apply output.")
        out[variant], paths[variant] = m, str(f)
    return out, paths


def _check_writable(out: Path) -> None:
    """Fail before rendering when ``out`` cannot be created or written (the CLI's --out)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserInputError(f"Cannot write the report into {str(out)!r} (--out): "
                             f"{str(probe)!r} is a file, not a directory. Pass another --out.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"Cannot write the report into {str(out)!r} (--out): "
                             f"{str(probe)!r} is not writable. Pass a writable directory with "
                             f"--out.")


# -- html --------------------------------------------------------------------------------------
_CSS = CSS


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
           cls: Callable[[int, Any], str] | None = None, **kw: Any) -> str:
    """A sortable HTML table in a scrolling box; every cell escaped; ``cls(column, value)`` may name
    a CSS class for a cell (see :func:`sensplan.reports._interactive.table` for ``kw``)."""
    return table(headers, rows, cell_class=cls, **kw)


def _img(png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode()
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{b64}"></figure>'


def _status_class(_: int, v: Any) -> str:
    s = str(v)
    return "bad" if s.startswith("MISSED") else "ok" if s == "met" else ""


def _goal(plan: Plan, fmt: _Fmt, units: Mapping[str, str]) -> str:
    obj = plan.data["objective"]
    if obj.get("mode") == "max_drop":
        goal = (f"the least {obj.get('minimize')} with a predicted {fmt.title} drop of at most "
                f"{fmt.drop(obj.get('max_drop'))} {fmt.drop_unit}")
    else:
        goal = ", ".join(f"{b['metric']} ≤ {b['fraction']:.3f} of the original "
                         f"({_cost(str(b['metric']), b.get('absolute'), units)})"
                         if _isnum(b.get("fraction")) else
                         f"{b['metric']} ≤ {_cost(str(b['metric']), b.get('absolute'), units)}"
                         for b in obj.get("budgets") or [])
    models = ", ".join(f"{c.get('name', '?')} ({', '.join(map(str, c.get('metrics', [])))})"
                       for c in plan.data.get("cost_models") or [])
    drop_model = obj.get("drop_model", "?")
    if obj.get("signal") not in (None, "drop") and (obj.get("drop_map") or {}).get("knots"):
        drop_model += " (the map is drawn under Drop model below)"
    return (f"<p><b>Goal:</b> {_e(goal)}.</p><p>{_e(f'Drop model: {drop_model}.')} "
            f"{_e('Costs: ' + (models or 'analytic') + '.')}</p>")


def _solver(plan: Plan) -> tuple[str, bool]:
    """The solver's section and whether the planned allocation is proven optimal."""
    sv = dict(plan.data.get("solver") or {})
    planned = plan.data["plans"].get("planned") or {}
    sv.update({k: v for k, v in (planned.get("solver") or {}).items()
               if k not in sv or v is not None})
    optimal = bool(sv.get("optimal"))
    rows = [["method", sv.get("method", "?")], ["status", sv.get("status", "?")],
            ["proven optimal", "yes" if optimal else "NO"],
            ["gap", f"{sv['gap']:.3g}" if _isnum(sv.get("gap")) else _DASH],
            ["seconds", f"{sv['seconds']:.3f}" if _isnum(sv.get("seconds")) else _DASH]]
    note = ("<p class='ok'>The planned allocation is proven optimal for the scan's drop model.</p>"
            if optimal else
            f"<p class='bad'>The solve is not proven optimal (status {_e(sv.get('status', '?'))}): "
            f"the planned allocation meets the objective, but a better one may exist. Re-plan "
            f"with a longer time limit (make_plan's time_limit).</p>")
    return note + _table(["", "value"], rows), optimal


def _methods_section(scan: Scan, sens: Mapping[str, _Sensitivity]) -> str:
    rows = []
    for name, info in scan.methods.items():
        s = sens.get(name)
        settings = ", ".join(s.columns) if s else ", ".join(
            _setting_text(x) for x in info.get("settings") or [])
        n_skip = len(info.get("skipped") or {})
        units = (f"{len(s.units) if s else 0} {info.get('unit_kind', 'unit')}(s) scanned"
                 + (f", {n_skip} skipped" if n_skip else ""))
        if info.get("unavailable"):
            units = f"unavailable: {info['unavailable']}"
        rows.append([name, f"{info.get('axis', '?')} ({info.get('unit_kind', '?')})",
                     "yes" if info.get("structural") else "no", info.get("description", ""),
                     info.get("speed_note", ""), settings, units])
    return ("<h2>Methods</h2><p>What each scanned method does, and what it does (or does not do) "
            "for speed. Methods on different axes combine on one unit; methods sharing an axis are "
            "alternatives.</p>"
            + _table(["method", "axis (unit)", "structural", "what", "speed", "settings scanned",
                      "units"], rows))


def _skipped_section(scan: Scan) -> str:
    parts = ["<h2>Skipped units</h2>"]
    graph = scan.data.get("pruning_graph") or {}
    if graph and not graph.get("available", True):
        parts.append(f"<p class='bad'>Channel dependency graph unavailable: "
                     f"{_e(graph.get('reason') or 'no reason recorded')}</p>")
    rows = [[m, "(every unit)", info["unavailable"]] for m, info in scan.methods.items()
            if info.get("unavailable")]
    rows += [[m, u, why] for m, sk in scan.skipped().items() for u, why in sk.items()]
    parts.append(_table(["method", "unit", "reason"], rows) if rows else
                 "<p>None: every method scanned every unit it applies to.</p>")
    return "".join(parts)


def _heatmaps(sens: Sequence[_Sensitivity], fmt: _Fmt, names: Mapping[str, str]) -> str:
    """One SVG heatmap per method, each on its own colour scale (a quantization map of 0-3 points
    is not washed out by a pruning map of 0-60), with hover values and click-to-select."""
    if not sens:
        return "<p>Nothing was scanned.</p>"
    f = fmt.factor

    def val(v: Any) -> str:
        return f"{float(v):.2f}" if fmt.percent else f"{float(v):.3g}"

    out = []
    for x in sens:
        values = [[None if np.isnan(v) else float(v) * f for v in row] for row in x.drops]
        ses = [[None if np.isnan(v) else float(v) * f for v in row] for row in x.ses]
        title = (f"{x.method} ({x.info.get('axis', '?')}): {fmt.title} drop per "
                 f"{x.info.get('unit_kind', 'unit')}")
        # drops within the probes' noise stay pale: the scale reaches at least 1.96 x the largest SE
        noise = 1.96 * max([v for row in ses for v in row if v is not None] + [0.0])
        top = max([v for row in values for v in row if v is not None] + [noise])
        out.append("<div>" + heatmap(title, x.units, names_of(names, x.info), x.columns, values, ses,
                                     unit_label=fmt.drop_unit, fmt_value=val, vmax=top) + "</div>")
    return "".join(out)


def _probe_se(scan: Scan) -> dict[tuple[str, str, str], float]:
    """(method, unit, label) -> the probe's drop standard error."""
    return {(str(r.get("method")), str(r.get("unit")), str(r.get("label"))): float(r["drop_se"])
            for r in scan.results if _isnum(r.get("drop_se"))}


def _worst(sens: Sequence[_Sensitivity]) -> dict[tuple[str, str | None], tuple[float, str]]:
    """(unit, axis) and (unit, None) -> its largest scanned drop (on that axis; on any) and where."""
    out: dict[tuple[str, str | None], tuple[float, str]] = {}
    for x in sens:
        for i, u in enumerate(x.units):
            row = x.drops[i]
            if not np.isfinite(row).any():
                continue
            j = int(np.nanargmax(row))
            where = x.columns[j] if x.columns[j].startswith(x.method) else f"{x.method} {x.columns[j]}"
            for k in ((u, str(x.info.get("axis"))), (u, None)):
                if k not in out or row[j] > out[k][0]:
                    out[k] = (float(row[j]), where)
    return out


def _units_section(scan: Scan, plan: Plan | None, sens: Sequence[_Sensitivity], fmt: _Fmt,
                   names: Mapping[str, str]) -> str:
    """Every unit (with a plan: every decision block) in one sortable, filterable table: the planned
    and uniform settings with their predicted drops and 95% intervals, the largest scanned drop, and
    why a method skipped the unit."""
    skipped: dict[tuple[str, str | None], list[str]] = {}  # (unit, axis) and (unit, None)
    for m, sk in scan.skipped().items():
        axis = str((scan.methods.get(m) or {}).get("axis"))
        for u, why in sk.items():
            for k in ((str(u), axis), (str(u), None)):
                skipped.setdefault(k, []).append(f"{m}: {why}")
    worst = _worst(sens)
    se_of = _probe_se(scan)
    on_groups = group_axes(scan.methods)
    skips = {m: {str(u) for u in sk} for m, sk in scan.skipped().items()}

    def shown(unit: str, axis: str | None) -> str:
        """A group unit by its label; a layer by its name (both when a unit of that name was
        scanned as a group by one method and as a layer by another)."""
        label = names.get(unit)
        if label is None:
            return unit
        if axis is not None:
            return label if axis in on_groups else unit
        kinds = {(scan.methods.get(m) or {}).get("unit_kind") for m in
                 [*(x.method for x in sens if unit in x.units), *(m for m, sk in skips.items() if unit in sk)]}
        return label if kinds == {"group"} else unit if "group" not in kinds else f"{unit} ({label})"

    def interval(c: Mapping[str, Any] | None, d: Any) -> tuple[str, Any]:
        if not c or not _isnum(d):
            return _DASH, None
        if not c.get("method"):
            return fmt.drop(d), d
        se = se_of.get((str(c.get("method")), str(c.get("unit")), str(c.get("label"))))
        if se is None or se <= 0:
            return fmt.drop(d), d
        return f"{fmt.drop(d)} [{fmt.drop(d - 1.96 * se)}, {fmt.drop(d + 1.96 * se)}]", d

    rows, keys, units = [], [], []
    listed: set[tuple[str, str]] = set()
    if plan is not None:
        planned = plan.data["plans"].get("planned") or {}
        uniform = plan.data["plans"].get("uniform") or {}
        blocks = _blocks(plan)
        for b in (b for axis_blocks in _by_axis(plan).values() for b in axis_blocks):
            c = blocks[b]
            unit = str(c.get("unit", b))
            pc = (planned.get("choices") or {}).get(b)
            uc = (uniform.get("choices") or {}).get(b)
            pd, pk = interval(pc, (planned.get("unit_drops") or {}).get(b))
            ud, uk = interval(uc, (uniform.get("unit_drops") or {}).get(b))
            w = worst.get((unit, str(c.get("axis"))))
            listed.add((unit, str(c.get("axis"))))
            rows.append([shown(unit, str(c.get("axis", "?"))), str(c.get("axis", "?")),
                         pc.get("label", pc.get("method") or "none") if pc else _DASH, pd,
                         uc.get("label", uc.get("method") or "none") if uc else _DASH, ud,
                         f"{fmt.drop(w[0])} ({w[1]})" if w else _DASH,
                         "; ".join(skipped.get((unit, str(c.get("axis"))), []))])
            keys.append([None, None, None, pk * fmt.factor if _isnum(pk) else None, None,
                         uk * fmt.factor if _isnum(uk) else None, w[0] * fmt.factor if w else None, None])
            units.append(unit)
        for (unit, ax), reasons in skipped.items():  # a unit no block lists on that axis: never planned
            if ax is not None and (unit, ax) not in listed:
                listed.add((unit, ax))
                rows.append([shown(unit, ax), ax, "not planned", _DASH, "not planned", _DASH, _DASH,
                             "; ".join(reasons)])
                keys.append([None] * 8)
                units.append(unit)
        headers = ["unit", "axis", "planned", f"planned drop, predicted ({fmt.drop_unit}) [95%]",
                   "uniform", f"uniform drop, predicted ({fmt.drop_unit}) [95%]",
                   f"largest scanned drop ({fmt.drop_unit})", "skipped by"]
    else:
        every = list(dict.fromkeys([u for x in sens for u in x.units] + [u for u, _ in skipped]))
        for unit in every:
            w = worst.get((unit, None))
            methods = [x.method for x in sens if unit in x.units]
            rows.append([shown(unit, None), ", ".join(methods) or _DASH,
                         f"{fmt.drop(w[0])} ({w[1]})" if w else _DASH, "; ".join(skipped.get((unit, None), []))])
            keys.append([None, None, w[0] * fmt.factor if w else None, None])
            units.append(unit)
        headers = ["unit", "methods scanned", f"largest scanned drop ({fmt.drop_unit})", "skipped by"]
    text = ("<h2>Per unit</h2><p>Sort by a column with a click on its header; type to filter (every word "
            "must match). A click on a heatmap cell selects its unit here. Intervals are 95%: the "
            "predicted drop ± 1.96 × the probe's paired standard error.</p>")
    return text + _table(headers, rows, table_id="units", keys=keys, row_units=units,
                         filter_label="filter units (e.g. conv int4)")


def _allocation_section(plan: Plan, fmt: _Fmt, png: bytes) -> str:
    uniform = plan.data["plans"].get("uniform")
    parts = ["<h2>Allocation</h2>"]
    if uniform is None:
        parts.append("<p>No uniform allocation meets the objective: only the planned one is "
                     "shown.</p>")
    else:
        u = uniform.get("uniform") or {}
        desc = ("The uniform baseline applies the same option to every unit of an axis: "
                f"{u.get('label', '?')}")
        if _isnum(u.get("ratio")) and u["ratio"]:
            desc += f"; {u['ratio']:.0%} of every channel group removed"
        parts.append(f"<p>{_e(desc)}.</p>")
    parts.append(_img(png, "per-unit allocation, planned vs uniform"))
    parts.append("<p class='muted'>Every unit's setting, with its predicted drop, is in the per-unit table "
                 "above.</p>")
    return "".join(parts)


def _provenance(scan: Scan, plan: Plan | None, results: Mapping[str, Mapping[str, Any]],
                paths: Mapping[str, str]) -> str:
    prov = scan.data.get("provenance") or {}
    rows = [["scan", scan.path or "(in memory)", _short(_digest(scan)), prov.get("started", "?"),
             (prov.get("versions") or {}).get("sensplan", "?")]]
    if plan is not None:
        rows.append(["plan", plan.path or "(in memory)", _short(_digest(plan)),
                     plan.data.get("created", "?"),
                     (plan.data.get("versions") or {}).get("sensplan", "?")])
    for name, r in results.items():
        applied = _short((r.get("plan") or {}).get("sha256"))
        rows.append([f"{name} result", paths.get(name, "?"), f"{applied} (plan applied)",
                     r.get("created", "?"),
                     (r.get("versions") or {}).get("sensplan", "?")])
    model = scan.data.get("model") or {}
    spec = model.get("spec") or {}
    data = scan.data.get("data") or {}
    calib = scan.data.get("calibration") or {}
    facts = [
        ["model", f"{spec.get('source', '?')} {json.dumps(spec.get('kwargs') or {}, default=str)}"],
        ["weights", f"{model.get('weights')} (sha256 {_short(model.get('weights_sha256'))})"],
        ["architecture digest", model.get("architecture_digest", "?")],
        ["evaluation data", f"{data.get('spec', '?')}: {data.get('n', '?')} samples, seed "
                            f"{data.get('seed', '?')}, indices {data.get('indices_sha256', '?')}"],
        ["BatchNorm calibration", f"{calib.get('spec')}: {calib.get('n')} samples, seed "
                                  f"{calib.get('seed')}" if calib else "none"],
        ["scan run", f"{prov.get('seconds', '?')} s on {prov.get('device', '?')} "
                     f"({prov.get('dtype', '?')}, {prov.get('torch_threads', '?')} threads)"],
        ["versions", ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items())],
    ]
    return ("<h2>Provenance</h2>"
            + _table(["artifact", "file", "sha256", "created", "sensplan"], rows)
            + _table(["what", "value"], facts))


def _write_figures(out: Path, s: Scan, p: Plan | None, sens: Sequence[Any], fmt: _Fmt,
                   headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   frontier: Frontier | None = None) -> dict[str, bytes]:
    """Render the PNG figures into ``out`` (removing a previous render's that no longer apply)."""
    names = display_names(s)
    figs: dict[str, bytes] = {"sensitivity_heatmap": fig_heatmap(sens, fmt, names),
                              "drop_curves": fig_curves(sens, fmt)}
    if p is not None:
        figs["allocation"] = fig_allocation(p, sens, list(s.methods), names)
        grid = fig_layer_grid(p, s)
        if grid is not None:
            figs["layer_grid"] = grid
        if p.data.get("verification"):
            figs["verification"] = fig_verification(p, fmt)
    figs["before_after"] = fig_table(headers, rows, f"before / after ({fmt.title})")
    if frontier is not None:
        figs["frontier"] = plot_frontier(frontier.data)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in figs.items():
        atomic_write_bytes(out / f"{name}.png", png)
    # a previous render's would contradict this page
    for name in ("allocation", "layer_grid", "verification", "frontier"):
        stale = out / f"{name}.png"
        if name not in figs and stale.is_file():
            stale.unlink()
    return figs


def _head(s: Scan, p: Plan | None, fmt: _Fmt, broken: Sequence[str], v: Verdict) -> list[str]:
    """The page's head, the digest-chain warning, the verdict, what was scanned, and the goal."""
    model = s.data.get("model") or {}
    spec = str((model.get("spec") or {}).get("source", "?"))
    data = s.data.get("data") or {}
    prov = s.data.get("provenance") or {}
    task = s.data.get("task") or {}
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
             f"<title>sensplan report: {_e(spec)}</title><style>{_CSS}</style></head><body>",
             "<div id='tip' role='tooltip'></div>",
             f"<h1>sensplan report: <code>{_e(spec)}</code></h1>"]
    if broken:
        parts.append("<div class='warn'><b>Warning: the digest chain is broken</b> (rendered with "
                     "--force). These files do not come from one run, so predictions and "
                     "measurements may not match:<ul>"
                     + "".join(f"<li>{_e(b)}</li>" for b in broken) + "</ul></div>")
    parts.append(f"<p class='verdict {_e(v.level)}' id='verdict'><b>Verdict:</b> {_e(v.line)}</p>")
    better = "higher" if fmt.metric.higher_is_better else "lower"
    parts.append("<p>" + _e(
        f"Task {task.get('name', '?')}: {fmt.title} ({better} is better). Evaluated on "
        f"{data.get('n', '?')} samples of {data.get('spec', '?')} (seed {data.get('seed', '?')}); "
        f"baseline {fmt.title} {fmt.score(s.baseline.get('score'))}. "
        f"Scan: {len(s.results)} probes over {len(s.methods)} method(s) in "
        f"{float(prov.get('seconds') or 0):.1f} s.") + "</p>")
    if p is not None:
        parts.append("<h2>Goal</h2>" + _goal(p, fmt, _cost_units(p)))
        if not _solver(p)[1]:
            parts.append("<p class='bad'>The solve is not proven optimal: see Solver below.</p>")
    return parts


def _results_sections(s: Scan, p: Plan | None, results: Mapping[str, Any], fmt: _Fmt,
                      headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Before / after, the budgets, and predicted against measured for each applied allocation."""
    units = _cost_units(p)
    parts = [f"<h2>Before / after</h2><p>{_e(fmt.title)} and costs of the original model, "
             f"then for each allocation what the scan predicts and what applying it measured. "
             f"A drop is positive when the model got worse.</p>" + _table(headers, rows)]
    before = next((r["before"] for r in results.values()), None)
    if before and before.get("score") != s.baseline.get("score"):
        parts.append("<p class='muted'>" + _e(
            f"The scan measured the original at {fmt.score(s.baseline.get('score'))} on its "
            f"{s.baseline.get('n', '?')} samples; apply measured {fmt.score(before.get('score'))} "
            f"on {before.get('n', '?')}. Predicted scores start from the scan's baseline; "
            f"measured drops from apply's.") + "</p>")
    budget_rows = _budget_rows(p, results, units)
    if budget_rows:
        parts.append("<h3>Budgets</h3>" + _table(["budget", "allocation", "predicted", "measured",
                                                  "status"], budget_rows, _status_class))
    for name, r in results.items():
        ft = r.get("after_without_finetune")
        note = f"Measured on {r['measured_on']}. " if r.get("measured_on") else ""
        note += (f"Fine-tuned; {fmt.title} before fine-tuning {fmt.score(ft.get('score'))}. "
                 if ft else "")
        diff = (r.get("after") or {}).get("reload_max_abs_diff")
        note += (f"The saved file reloads to outputs within {diff:.3g} of the in-memory model."
                 if _isnum(diff) else "")
        parts.append(f"<h3>{_e(name)}: predicted vs measured</h3>"
                     + (f"<p class='muted'>{_e(note)}</p>" if note else "")
                     + _table(["quantity", "predicted", "measured", "measured / predicted"],
                              _comparisons(r, fmt, units)))
        parts += _speed_section(name, r, fmt)
    return parts


def _speed_section(name: str, r: Mapping[str, Any], fmt: _Fmt) -> list[str]:
    """Latency timed interleaved (torch and, when measured, ONNX Runtime), the runtime's score and
    agreement, and the classes that lost most."""
    parts = []
    rows = []
    for where, timing in (("torch", r.get("timing")), ("ONNX Runtime", (r.get("runtime") or {}).get("latency"))):
        for batch, t in ((timing or {}).get("batches") or {}).items():
            o, c = t["original"], t["compressed"]
            rows.append([where, batch, f"{o['p50_ms']:.3f} / {o['p95_ms']:.3f}",
                         f"{c['p50_ms']:.3f} / {c['p95_ms']:.3f}",
                         f"{o['p50_ms'] / c['p50_ms']:.2f}x" if c["p50_ms"] else "–"])
    if rows:
        warn = [w for w in ((r.get("timing") or {}).get("warning"),
                            ((r.get("runtime") or {}).get("latency") or {}).get("warning")) if w]
        threads = (r.get("timing") or {}).get("threads") or (r.get("runtime") or {}).get("threads")
        parts.append(f"<h3>{_e(name)}: latency</h3><p class='muted'>p50 / p95 in ms, original and compressed "
                     f"timed interleaved in one process on {_e(threads)} thread(s).</p>"
                     + "".join(f"<p class='warn'>{_e('Unreliable: ' + w)}</p>" for w in warn)
                     + _table(["runtime", "batch", "original", "compressed", "speed-up"], rows))
    rt = r.get("runtime")
    if rt:
        o, c = rt["original"], rt["compressed"]
        q = rt.get("quantized") or {}
        floats = "; ".join(f"{k}: {v}" for k, v in list((q.get("float_layers") or {}).items())[:8])
        parts.append(f"<h3>{_e(name)}: on ONNX Runtime {_e(rt.get('version'))}</h3>" + _table(
            ["", "original", "compressed"],
            [[fmt.title, fmt.score(o["score"]), fmt.score(c["score"])],
             ["top-1 agreement with the torch model", f"{o['agreement_with_torch']['top1_agreement']:.4f}",
              f"{c['agreement_with_torch']['top1_agreement']:.4f}"],
             ["max output difference from torch", f"{o['agreement_with_torch']['max_abs_diff']:.3g}",
              f"{c['agreement_with_torch']['max_abs_diff']:.3g}"],
             ["model.onnx", _si(o["file_bytes"], "B"), _si(c["file_bytes"], "B")],
             ["peak memory added (MiB)", _e(o.get("peak_memory_mb")), _e(c.get("peak_memory_mb"))]])
            + f"<p class='muted'>{_e(q.get('int8_nodes', 0))} layer(s) run in int8"
            + (_e(f"; in float: {floats}") if floats else "") + "</p>")
    worst = (r.get("per_class") or [])[:5]
    if len(r.get("per_class") or []) > 1:
        parts.append(f"<h3>{_e(name)}: classes that lost most</h3>" + _table(
            ["class", "items", "before", "after", "change"],
            [[_e(w["class"]), w["n"], fmt.score(w["before"]), fmt.score(w["after"]),
              f"{w['change']:+.4f}"] for w in worst]))
    return parts


def _frontier_section(f: Frontier, fmt: _Fmt) -> str:
    """Each budget of the sweep: the planned and the uniform drop, predicted and measured."""
    d = f.data
    metric, ms = d["metric"], d.get("measurement") or {}
    original = float(d["original"][metric] or 0.0)

    def measured(entry: Any) -> str:
        m = (entry or {}).get("measured")
        return fmt.drop(m.get("drop"), m.get("drop_se")) if m else _DASH

    rows = []
    for p in d["points"]:
        b, uni = p["budget"], p.get("uniform")
        rows.append([str(p["index"]), f"{b['fraction']:.3f}" if _isnum(b.get("fraction")) else _si(b.get("absolute")),
                     fmt.drop(p["planned"]["predicted"].get("drop")),
                     f"{fmt.drop(uni['predicted'].get('drop'))} ({uni.get('label', '?')})" if uni else "none fits",
                     measured(p["planned"]), measured(uni)])
    cheapest = float(d.get("cheapest") or 0.0)
    text = (f"{len(d['points'])} budgets of {metric}, from the cheapest reachable plan"
            + (f" ({cheapest / original:.3f} of the original)" if original else "")
            + f" to one step under the original, spaced {str(d.get('spacing_rule', d.get('spacing', '?')))}. "
              f"Each was solved by the planner, beside the uniform allocation at the same budget, and each "
              f"plan is in {Path(f.path).parent / 'points' if f.path else 'points/'}. "
            + (f"Measured ({fmt.title} drop ± its paired standard error): {len(ms.get('points', []))} of them, "
               f"applied without fine-tuning, on {ms.get('measured_on')}." if ms else "None was measured."))
    return ("<h2>Pareto frontier</h2><p>" + _e(text) + "</p>"
            + _table(["point", f"{metric} budget (fraction)" if original else f"{metric} budget",
                      f"planned drop, predicted ({fmt.drop_unit})", "uniform drop, predicted",
                      "planned drop, measured", "uniform drop, measured"], rows)
            + _frontier_chart(d, fmt))


def _frontier_chart(d: Mapping[str, Any], fmt: _Fmt) -> str:
    """The frontier as an SVG: the drop against the budget, planned and uniform, predicted and (where
    measured) measured. Nothing for a single budget: one point is not a curve."""
    metric = d["metric"]
    original = float(d["original"][metric] or 0.0)
    points = d["points"]
    if len(points) < 2:
        return ""
    f = fmt.factor

    def x_of(p: Mapping[str, Any]) -> Any:
        b = p["budget"]
        if _isnum(b.get("fraction")):
            return b["fraction"]
        return b["absolute"] / original if original and _isnum(b.get("absolute")) else b.get("absolute")

    series = []
    for name, key in (("planned", "planned"), ("uniform", "uniform")):
        for what in ("predicted", "measured"):
            pts = []
            for p in points:
                e = p.get(key) or {}
                m = e.get(what) or {}
                if _isnum(m.get("drop")) and _isnum(x_of(p)):
                    label = f" ({e.get('label')})" if key == "uniform" and e.get("label") else ""
                    pts.append({"x": float(x_of(p)), "y": f * float(m["drop"]),
                                "tip": f"{name}{label} at {metric} {float(x_of(p)):.3f}: {what} drop "
                                       f"{fmt.drop(m['drop'], m.get('drop_se'))} {fmt.drop_unit}"})
            if pts:
                series.append({"name": f"{name}, {what}", "points": pts, "line": what == "predicted",
                               "marker": "circle" if name == "planned" else "square",
                               "colour": ("#1f77b4" if name == "planned" else "#ff7f0e") if what == "predicted"
                               else ("#0b3d91" if name == "planned" else "#a04000")})
    if not series:
        return ""
    return chart(f"{fmt.title} drop against {metric}", series,
                 xlabel=f"{metric} budget (fraction of the original)" if original else f"{metric} budget",
                 ylabel=f"{fmt.title} drop ({fmt.drop_unit})", fmt_x=lambda v: f"{v:.2f}")


def _scope_section(p: Plan) -> str:
    """The layers the ``bits`` metric leaves out (an LM head) and what they weigh."""
    scope = p.data.get("scope") or {}
    out = scope.get("out_of_scope") or {}
    if not out:
        return ""
    rows = [[name, f"{v.get('weights', 0):,}", v.get("reason", "")] for name, v in out.items()]
    return ("<h3>Out of scope</h3><p>" + _e(
        f"Left as they are, and outside the bits metric (mean stored bits per weight over "
        f"{scope.get('weights', 0):,} weights of {len(scope.get('layers') or [])} layers): these layers. "
        f"Embeddings are not layers sensplan scans; size, MACs and params count the whole model.")
        + "</p>" + _table(["layer", "weights", "why"], rows))


def render_report(scan: str | os.PathLike[str] | Scan, out_dir: str | os.PathLike[str], *,
                  plan: str | os.PathLike[str] | Plan | None = None,
                  result: str | os.PathLike[str] | None = None, force: bool = False,
                  frontier: str | os.PathLike[str] | Frontier | None = None) -> Path:
    """Write ``report.html`` and the PNG figures (:data:`FIGURES`) into ``out_dir``; return the
    HTML's path.

    ``result`` is the output directory of ``sensplan apply`` (or one ``metrics.json``);
    ``frontier`` a ``frontier.json`` (``sensplan frontier``), shown as its own section. The
    digest chain must hold: the plan and the frontier record the sha256 of the scan file, each
    metrics.json that of the plan file. A broken link raises :class:`~sensplan._errors.ArtifactError`; with
    ``force=True`` the report is rendered anyway, with a warning at its top. An ``out_dir`` that
    cannot be written raises :class:`~sensplan._errors.UserInputError` before anything is
    rendered.

    Example: ``render_report("scan.json", "report/", plan="plan.json", result="result/")``.
    """
    s = scan if isinstance(scan, Scan) else Scan.load(scan)
    p = plan if isinstance(plan, Plan) or plan is None else Plan.load(plan)
    results, paths = _load_results(result)
    f = frontier if isinstance(frontier, Frontier) or frontier is None else Frontier.load(frontier)
    broken = chain_problems(s, p, results, paths)
    want = (f.data.get("scan") or {}).get("sha256") if f is not None else None
    if f is not None and want and want != _digest(s):
        broken.append(f"the frontier {f.path or '(in memory)'!r} was made from a scan with sha256 {_short(want)}, "
                      f"but {_where(s, 'scan')} has sha256 {_short(_digest(s))}")
    if broken and not force:
        raise ArtifactError("The artifacts do not belong together: " + "; ".join(broken)
                            + ". Pass the files of one run, or pass --force to render anyway.")
    out = Path(out_dir)
    _check_writable(out)
    fmt = _Fmt(s.metric)
    sens = sensitivities(s)
    headers, rows = _comparison_rows(s, p, results, fmt)
    figs = _write_figures(out, s, p, sens, fmt, headers, rows, f)
    v = verdict(p, results, s.metric)
    parts = [*_head(s, p, fmt, broken, v), *_results_sections(s, p, results, fmt, headers, rows)]
    parts.append(_methods_section(s, {x.method: x for x in sens}))
    parts.append(f"<h2>Sensitivity</h2><p>{_e(fmt.title)} drop in {_e(fmt.drop_unit)} when one "
                 f"unit alone is compressed by one method at one setting (positive = worse). "
                 f"Settings run from weaker to stronger; a grey cell was not probed.</p>")
    estimated = sum(1 for r in s.results if r.get("estimated"))
    if estimated:
        parts.append(f"<p><b>A fast scan:</b> {estimated} of its {len(s.results)} probes were estimated "
                     f"(<code>scan --fast</code>: the Fisher estimate of the KL divergence, in scan.json's "
                     f"signals), not measured, so they have no drop and are grey here. The plan maps the "
                     f"estimate to the drop through the measured ones.</p>")
    parts.append(_heatmaps(sens, fmt, display_names(s)))
    if any(len(x.columns) > 1 for x in sens):  # a curve needs two settings
        parts.append(_img(figs["drop_curves"], f"{fmt.title} drop curves per method"))
    parts.append(_units_section(s, p, sens, fmt, display_names(s)))
    if p is not None:
        parts.append(drop_map_section(s, p, fmt))
        parts.append(_verification_section(p, fmt, predicted_vs_measured(p, results, fmt)))
        parts.append(_allocation_section(p, fmt, figs["allocation"]))
        if "layer_grid" in figs:
            parts.append("<h3>Per layer</h3><p>The planned allocation of each transformer layer: its "
                         "attention heads and MLP width (pruning), then each projection's weight format.</p>"
                         + _img(figs["layer_grid"], "planned allocation per layer"))
        parts.append(_scope_section(p))
    if f is not None:
        parts.append(_frontier_section(f, fmt))
    parts.append(_skipped_section(s))
    if p is not None:
        parts.append("<h2>Solver</h2>" + _solver(p)[0])
    parts.append(_provenance(s, p, results, paths))
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    doc = "\n".join(parts)
    path = out / "report.html"
    atomic_write(path, lambda f: f.write(doc.encode()))
    return path
