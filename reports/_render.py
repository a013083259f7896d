"""Render ``report.html`` (self-contained, opens offline) and PNG charts from the artifacts alone.

Reads ``scan.json``, optionally ``plan.json`` and an ``apply`` result directory (``metrics.json`` and
``uniform/metrics.json``). Never loads a model. Every name taken from the model is HTML-escaped.
Percentages appear only here; the artifacts hold fractions.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen on these machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sensplan._artifacts import atomic_write, atomic_write_bytes  # noqa: E402
from sensplan._errors import ArtifactError  # noqa: E402
from sensplan.planner import Plan, load_metrics  # noqa: E402
from sensplan.sensitivity import Scan  # noqa: E402

FIGURES = ("sensitivity_heatmap", "drop_curves", "allocation", "before_after")


def _pp(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x / 1e6:.3f} MB"


def _mega(x: float | None) -> str:
    return "–" if x is None else f"{x / 1e6:.2f} M"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# -- figures -----------------------------------------------------------------------------------------
def _matrix(scan: Scan, kind: str) -> tuple[list[str], list[Any], np.ndarray]:
    key = "ratio" if kind == "prune" else "bits"
    units = scan.scanned_groups() if kind == "prune" else list(scan.layers)
    settings = sorted({r[key] for r in scan.results if r["kind"] == kind}, reverse=(kind == "quantize"))
    units = [u for u in units if scan.results_for(u, kind)]
    m = np.full((len(units), len(settings)), np.nan)
    for i, u in enumerate(units):
        for r in scan.results_for(u, kind):
            m[i, settings.index(r[key])] = r["drop"]
    return units, settings, m


def fig_heatmap(scan: Scan) -> bytes:
    parts = [(k, *_matrix(scan, k)) for k in ("prune", "quantize")]
    parts = [p for p in parts if p[1]]
    if not parts:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "nothing was scanned", ha="center", va="center")
        ax.axis("off")
        return _png(fig)
    heights = [max(1.5, 0.28 * len(p[1]) + 1.0) for p in parts]
    fig, axes = plt.subplots(len(parts), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    vmax = max(0.01, float(np.nanmax([np.nanmax(p[3]) for p in parts])))
    for ax, (kind, units, settings, m) in zip(axes[:, 0], parts, strict=True):
        im = ax.imshow(np.clip(m, 0, None) * 100, aspect="auto", cmap="magma_r", vmin=0, vmax=vmax * 100)
        ax.set_yticks(range(len(units)), units, fontsize=7)
        labels = [f"{s:.0%}" if kind == "prune" else f"{s}b" for s in settings]
        ax.set_xticks(range(len(settings)), labels, fontsize=8)
        ax.set_xlabel("channels removed" if kind == "prune" else "weight bits")
        ax.set_title("pruning: top-1 drop per channel group (points)" if kind == "prune"
                     else "quantization: top-1 drop per layer (points)", fontsize=10)
        if len(units) * len(settings) <= 400:
            for i in range(len(units)):
                for j in range(len(settings)):
                    if not np.isnan(m[i, j]):
                        v = m[i, j] * 100
                        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6,
                                color="white" if v > 0.6 * vmax * 100 else "black")
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    return _png(fig)


def fig_curves(scan: Scan) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind in zip(axes, ("prune", "quantize"), strict=True):
        units, settings, m = _matrix(scan, kind)
        if not units:
            ax.text(0.5, 0.5, f"no {kind} results", ha="center", va="center", transform=ax.transAxes)
            ax.axis("off")
            continue
        worst = set(np.argsort(-np.nan_to_num(np.nanmax(m, axis=1), nan=0))[:8])
        xs = [s * 100 for s in settings] if kind == "prune" else list(settings)
        for i, u in enumerate(units):
            if i in worst:
                ax.plot(xs, m[i] * 100, marker="o", ms=3, lw=1.4, label=u)
            else:
                ax.plot(xs, m[i] * 100, color="0.7", lw=0.8)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("channels removed (%)" if kind == "prune" else "weight bits")
        ax.set_ylabel("top-1 drop (points)")
        if kind == "quantize":
            ax.invert_xaxis()
        ax.set_title("pruning sensitivity per group" if kind == "prune" else "quantization sensitivity per layer",
                     fontsize=10)
        ax.legend(fontsize=6, title="most sensitive", title_fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_allocation(scan: Scan, plan: Plan) -> bytes:
    planned = plan.data["plans"]["planned"]
    uniform = plan.data["plans"].get("uniform")
    groups = list(planned["prune"])
    layers = list(planned["quantize"])
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.5, 0.22 * max(len(groups), len(layers)) + 1.5)))
    y = np.arange(len(groups))
    axes[0].barh(y - 0.2, [planned["prune"][g]["n_remove"] / planned["prune"][g]["channels"] * 100 for g in groups],
                 height=0.4, label="planned", color="tab:blue")
    if uniform:
        axes[0].barh(y + 0.2, [uniform["prune"][g]["n_remove"] / uniform["prune"][g]["channels"] * 100
                               for g in groups], height=0.4, label="uniform", color="tab:gray")
    for i, g in enumerate(groups):
        if planned["prune"][g]["status"] != "scanned":
            axes[0].text(1, i, "skipped", va="center", fontsize=7, color="tab:red")
    axes[0].set_yticks(y, groups, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("channels removed (%)")
    axes[0].set_title("pruning per channel group", fontsize=10)
    axes[0].legend(fontsize=8)
    y = np.arange(len(layers))
    axes[1].barh(y - 0.2, [planned["quantize"][q]["bits"] for q in layers], height=0.4, label="planned",
                 color="tab:orange")
    if uniform:
        axes[1].barh(y + 0.2, [uniform["quantize"][q]["bits"] for q in layers], height=0.4, label="uniform",
                     color="tab:gray")
    axes[1].set_yticks(y, layers, fontsize=7)
    axes[1].invert_yaxis()
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks([2, 3, 4, 6, 8, 32], ["2", "3", "4", "6", "8", "32 (float)"])
    axes[1].set_xlabel("weight bits")
    axes[1].set_title("weight bits per layer", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _comparison_rows(scan: Scan, plan: Plan | None, results: Mapping[str, Mapping[str, Any]]) -> tuple[
        list[str], list[list[str]]]:
    """Rows: metric; columns: original, then predicted/measured for planned and uniform."""
    cols = ["original"]
    data: list[dict[str, str]] = []
    before = next((r["before"] for r in results.values()), None)
    orig = plan.original if plan else {}
    fine_tuned = any(r.get("after_without_finetune") for r in results.values())
    data.append({
        "top-1 (%)": _pp(before["top1"] if before else scan.baseline["top1"]),
        **({"top-1 before fine-tuning (%)": "–"} if fine_tuned else {}),
        "size": _mb(before["payload_bytes"] if before else orig.get("size")),
        "file on disk": _mb(before["file_bytes"]) if before else "–",
        "MACs": _mega(before["macs"] if before else orig.get("macs")),
        "params": _mega(before["params"] if before else orig.get("params")),
        "latency p50 / p95": (f"{before['latency']['p50_ms']:.2f} / {before['latency']['p95_ms']:.2f} ms"
                              if before and "latency" in before else "–"),
    })
    for name in ("planned", "uniform"):
        alloc = plan.data["plans"].get(name) if plan else None
        if alloc is None:
            continue
        p = alloc["predicted"]
        cols.append(f"{name} (predicted)")
        data.append({"top-1 (%)": _pp(p["top1"]),
                     **({"top-1 before fine-tuning (%)": _pp(p["top1"])} if fine_tuned else {}),
                     "size": _mb(p["size"]), "file on disk": "–",
                     "MACs": _mega(p["macs"]), "params": _mega(p["params"]), "latency p50 / p95": "–"})
        r = results.get(name)
        if r is not None:
            a = r["after"]
            no_ft = r.get("after_without_finetune")
            cols.append(f"{name} (measured)")
            data.append({"top-1 (%)": _pp(a["top1"]),
                         **({"top-1 before fine-tuning (%)": _pp(no_ft["top1"]) if no_ft else "–"}
                            if fine_tuned else {}),
                         "size": _mb(a["payload_bytes"]), "file on disk": _mb(a["file_bytes"]),
                         "MACs": _mega(a["macs"]), "params": _mega(a["params"]),
                         "latency p50 / p95": (f"{a['latency']['p50_ms']:.2f} / {a['latency']['p95_ms']:.2f} ms"
                                               if "latency" in a else "–")})
    metrics = list(data[0])
    rows = [[m] + [d[m] for d in data] for m in metrics]
    return ["metric", *cols], rows


def fig_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> bytes:
    fig, ax = plt.subplots(figsize=(min(16, 2.6 + 1.9 * (len(headers) - 1)), 0.3 * (len(rows) + 1) + 0.3))
    ax.axis("off")
    t = ax.table(cellText=[list(r) for r in rows], colLabels=list(headers), loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.auto_set_column_width(list(range(len(headers))))
    t.scale(1, 1.4)
    ax.set_title("before / after", fontsize=10)
    return _png(fig)


# -- html ----------------------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .6em;
text-align:left}th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;
padding:0 .2em}.bad{color:#b00}.ok{color:#070}.muted{color:#777;font-size:.85em}"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(name: str, png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></figure>'


def _load_results(result: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    if result is None:
        return {}
    root = Path(result)
    if not root.is_dir():
        raise ArtifactError(f"The result directory {str(root)!r} does not exist. Pass the --out of `sensplan apply`.")
    out = {}
    if (root / "metrics.json").is_file():
        m = load_metrics(root / "metrics.json")
        out[m["variant"]] = m
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / "metrics.json").is_file():
            m = load_metrics(sub / "metrics.json")
            out[m["variant"]] = m
    if not out:
        raise ArtifactError(f"{str(root)!r} holds no metrics.json. Pass the --out of `sensplan apply`.")
    return out


def render_report(scan: str | os.PathLike[str] | Scan, out_dir: str | os.PathLike[str], *,
                  plan: str | os.PathLike[str] | Plan | None = None,
                  result: str | os.PathLike[str] | None = None) -> Path:
    """Write ``report.html`` and the PNG figures into ``out_dir``; return the HTML's path.

    Example: ``render_report("scan.json", "report/", plan="plan.json", result="result/")``.
    """
    s = scan if isinstance(scan, Scan) else Scan.load(scan)
    p = plan if isinstance(plan, Plan) or plan is None else Plan.load(plan)
    results = _load_results(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    figs: dict[str, bytes] = {"sensitivity_heatmap": fig_heatmap(s), "drop_curves": fig_curves(s)}
    headers, rows = _comparison_rows(s, p, results)
    if p is not None:
        figs["allocation"] = fig_allocation(s, p)
    figs["before_after"] = fig_table(headers, rows)
    for name, png in figs.items():
        atomic_write_bytes(out / f"{name}.png", png)

    model = s.data["model"]
    spec = (model.get("spec") or {}).get("source", "?")
    data = s.data.get("data", {})
    prov = s.data.get("provenance", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sensplan report: {html.escape(spec)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>sensplan report: <code>{html.escape(spec)}</code></h1>",
             "<p>" + html.escape(
                 f"Evaluated on {data.get('n', '?')} samples of {data.get('spec', '?')} (stratified, seed "
                 f"{data.get('seed', '?')}); baseline top-1 {_pp(s.baseline['top1'])}%, loss "
                 f"{s.baseline['loss']:.4f}. Scan: {len(s.results)} probes in {prov.get('seconds', 0):.1f} s.")
             + "</p>"]
    if p is not None:
        obj = p.data["objective"]
        if obj["mode"] == "budget":
            goal = ", ".join(f"{b['metric']} ≤ {b['fraction']:.3f} of the original" for b in obj["budgets"])
        else:
            goal = f"least {obj['minimize']} with predicted drop ≤ {_pp(obj['max_drop'])} points"
        parts.append(f"<p><b>Goal:</b> {html.escape(goal)}. The predicted drop adds the per-unit drops of the "
                     f"scan; costs are computed exactly from the tensor shapes.</p>")
    parts.append("<h2>Before / after</h2>" + _table(headers, rows))
    for name, r in results.items():
        checks = []
        for b in r.get("budgets", []):
            cls = "ok" if b["met"] else "bad"
            checks.append(f"<span class='{cls}'>{html.escape(b['metric'])} budget "
                          f"{'met' if b['met'] else 'MISSED'}</span>")
        comp = r.get("comparison", {})
        cmp_rows = [[k, f"{v['predicted']:.6g}", f"{v['measured']:.6g}",
                     f"{v['ratio']:.4f}" if v.get("ratio") is not None else "–"]
                    for k, v in comp.items() if k != "drop_without_finetune"]
        d = comp.get("drop_without_finetune")
        if d:
            cmp_rows.append(["top-1 drop without fine-tuning (points)", _pp(d["predicted"]), _pp(d["measured"]), "–"])
        parts.append(f"<h3>{html.escape(name)}: predicted vs measured</h3><p>{' · '.join(checks)}</p>"
                     + _table(["quantity", "predicted", "measured", "measured / predicted"], cmp_rows))
    parts.append("<h2>Sensitivity</h2><p>Top-1 drop in percentage points when one unit alone is compressed "
                 "(positive = worse). Pruning probes remove a whole coupled channel group.</p>")
    parts.append(_img("sensitivity_heatmap", figs["sensitivity_heatmap"], "sensitivity heatmap"))
    parts.append(_img("drop_curves", figs["drop_curves"], "per-unit drop curves"))
    if p is not None:
        parts.append("<h2>Allocation</h2>" + _img("allocation", figs["allocation"], "per-unit allocation"))
        planned = p.data["plans"]["planned"]
        uni = p.data["plans"].get("uniform") or {"prune": {}, "quantize": {}}
        unit_rows = []
        for g, e in planned["prune"].items():
            ue = uni["prune"].get(g, {})
            unit_rows.append([g, "prune", f"{e['n_remove']}/{e['channels']} channels",
                              f"{ue.get('n_remove', 0)}/{e['channels']}" if ue else "–",
                              _pp(planned.get("unit_drops", {}).get(f"prune:{g}")), e["status"]])
        for q, e in planned["quantize"].items():
            ue = uni["quantize"].get(q, {})
            unit_rows.append([q, "quantize", "float32" if e["bits"] == 32 else f"{e['bits']} bits",
                              ("float32" if ue.get("bits") == 32 else f"{ue.get('bits')} bits") if ue else "–",
                              _pp(planned.get("unit_drops", {}).get(f"quantize:{q}")), ""])
        parts.append(_table(["unit", "kind", "planned", "uniform", "predicted drop (points)", "status"], unit_rows))
    skipped = s.skipped_groups()
    parts.append("<h2>Skipped channel groups</h2>")
    if skipped:
        parts.append(_table(["group (root)", "members", "reason"],
                            [[g, len(s.groups[g]["members"]), why] for g, why in skipped.items()]))
    else:
        parts.append("<p>None: every channel group was scanned.</p>")
    versions = prov.get("versions", {})
    parts.append("<h2>Provenance</h2><p class='muted'>" + html.escape(
        f"model {spec}; weights {model.get('weights')} (sha256 {str(model.get('weights_sha256'))[:16]}); "
        f"scan started {prov.get('started')}; " + ", ".join(f"{k} {v}" for k, v in versions.items())) + "</p>")
    parts.append("</body></html>")
    doc = "\n".join(parts)
    path = out / "report.html"
    atomic_write(path, lambda f: f.write(doc.encode()))
    return path
