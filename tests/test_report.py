"""The report, rendered from real artifacts of a tiny model (scan -> plan -> apply in ~2 s)."""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sensplan._errors import ArtifactError, UserInputError
from sensplan._tables import Scan, load_metrics
from sensplan.planner import Budget, Plan, apply_plan, make_plan
from sensplan.reports import FIGURES, render_report
from sensplan.sensitivity import ModelSpec, ScanConfig, scan
from tests.conftest import seeded_model, self_labelled

EVIL = '<img src=x onerror="alert(1)">$x$'
SETTINGS = {"prune": [{"ratio": 0.25}, {"ratio": 0.5}], "weight_quant": [{"bits": 8}, {"bits": 4}],
            "sparsity": [{"ratio": 0.5}]}
BUDGETS = ("macs=0.8", "size=0.5")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scan.json, plan.json (two budgets) and result/ (planned) + result/uniform/ on disk."""
    root = tmp_path_factory.mktemp("run")
    spec = ModelSpec("sensplan:tiny_convnet", {})
    model = seeded_model("tiny_convnet")
    data = self_labelled(model, n=64)
    table = scan(model, data, ScanConfig(SETTINGS), model_spec=spec, progress=False)
    table = table.save(root / "scan.json")
    plan = make_plan(table, [Budget.parse(b) for b in BUDGETS]).save(root / "plan.json")
    assert plan.data["plans"]["uniform"] is not None
    for variant in ("planned", "uniform"):
        out = root / "result" / ("" if variant == "planned" else variant)
        apply_plan(model, plan, data, out, variant=variant, model_spec=spec, timing=False)
    return {"root": root, "scan": root / "scan.json", "plan": root / "plan.json",
            "result": root / "result"}


def _render(run: dict[str, Path], out: Path, **kw: object) -> str:
    kw.setdefault("plan", run["plan"])
    kw.setdefault("result", run["result"])
    return render_report(run["scan"], out, **kw).read_text()  # type: ignore[arg-type]


def _is_png(data: bytes) -> bool:
    import io

    Image.open(io.BytesIO(data)).verify()  # raises on a truncated or corrupt file
    return data[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_methods_budgets_numbers_and_skips(run, tmp_path):
    doc = _render(run, tmp_path)
    s, p = Scan.load(run["scan"]), Plan.load(run["plan"])
    # every scanned method with what it does and its speed note
    assert set(s.methods) == set(SETTINGS)
    for name, info in s.methods.items():
        assert f"<td>{html.escape(name)}</td>" in doc
        assert html.escape(info["description"]) in doc
        assert info["speed_note"] and html.escape(info["speed_note"]) in doc
    # every budget, for both allocations, with its status
    for b in p.data["objective"]["budgets"]:
        line = f"{b['metric']} ≤ {b['fraction']:.3f} × original"
        assert doc.count(line) == 2, line
    assert doc.count("<td class='ok'>met</td>") == 4 and "MISSED" not in doc
    # predicted and measured numbers of both allocations
    for variant in ("planned", "uniform"):
        m = load_metrics(run["result"] / ("" if variant == "planned" else variant) / "metrics.json")
        assert f"{100 * m['after']['score']:.2f}%" in doc
        assert f"{100 * p.data['plans'][variant]['predicted']['score']:.2f}%" in doc
        assert f"<h3>{variant}: predicted vs measured</h3>" in doc
        for k, v in m["comparison"].items():
            if "ratio" in v:
                assert f"<td>{k}</td>" in doc and f"{v['ratio']:.4f}" in doc
    label = p.variant("uniform")["uniform"]["label"]
    for col in ("planned (predicted)", "planned (measured)", f"uniform {label} (predicted)",
                f"uniform {label} (measured)"):
        assert f"<th>{html.escape(col)}</th>" in doc
    # skipped units with their reasons
    skipped = {(m, u): why for m, sk in s.skipped().items() for u, why in sk.items()}
    assert skipped, "the tiny convnet's output group is never prunable"
    for (m, u), why in skipped.items():
        cells = "".join(f"<td>{html.escape(x)}</td>" for x in (m, u, why))
        assert cells in doc
    # the per-unit table lists every block (a row of its unit), with both option labels
    for block, c in p.variant("planned")["choices"].items():
        u = p.variant("uniform")["choices"][block]
        assert (f"<tr data-unit='{html.escape(c['unit'])}'><td>{html.escape(c['unit'])}</td>"
                f"<td>{html.escape(c['axis'])}</td><td>{html.escape(c['label'])}</td>") in doc
        assert f"<td>{html.escape(u['label'])}</td>" in doc
    assert "proven optimal" in doc and "not proven optimal" not in doc
    assert "top-1" in doc and "Provenance" in doc and str(run["scan"]) in doc
    for h in ("Goal", "Before / after", "Methods", "Sensitivity", "Allocation", "Skipped units",
              "Solver"):
        assert f"<h2>{h}</h2>" in doc


def test_report_is_self_contained_with_valid_pngs(run, tmp_path):
    doc = _render(run, tmp_path)
    srcs = re.findall(r'src="([^"]+)"', doc)
    # before/after is a table on the page (a PNG beside it), the heatmaps are inline SVG (a PNG
    # beside them); this plan was made without verification, and its model is no transformer (no
    # layer grid)
    assert len(srcs) == len(FIGURES) - 4
    # one heatmap per method, the drop map (the plan added up the KL divergence), and predicted
    # against measured for the two applied allocations
    assert doc.count("<svg class='chart'") == len(Scan.load(run["scan"]).methods) + 2
    assert "planned as applied" in doc and "uniform as applied" in doc
    assert "This plan was not verified" in doc
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert _is_png(base64.b64decode(src.split(",", 1)[1]))
    # one inline script, the report's own: nothing is fetched
    assert not re.search(r'(href|src)=["\']https?:', doc) and doc.count("<script") == 1
    assert "<script>" in doc and "<script src" not in doc
    for name in FIGURES:
        if name not in ("verification", "layer_grid"):
            assert _is_png((tmp_path / f"{name}.png").read_bytes()), name
    assert not (tmp_path / "verification.png").exists() and not (tmp_path / "layer_grid.png").exists()


def test_report_from_a_scan_alone(run, tmp_path):
    (tmp_path / "allocation.png").write_bytes(b"stale")
    doc = render_report(run["scan"], tmp_path).read_text()
    assert "<h2>Sensitivity</h2>" in doc and "<h2>Allocation</h2>" not in doc
    assert "<h2>Methods</h2>" in doc and "Solver" not in doc
    assert _is_png((tmp_path / "sensitivity_heatmap.png").read_bytes())
    assert not (tmp_path / "allocation.png").exists()


def test_results_without_a_plan_show_what_the_metrics_record(run, tmp_path):
    doc = render_report(run["scan"], tmp_path, result=run["result"]).read_text()
    assert "<th>planned (predicted)</th>" in doc and "<th>uniform (measured)</th>" in doc
    assert "<h2>Allocation</h2>" not in doc and "<h2>Goal</h2>" not in doc


def test_an_unavailable_pruning_graph_is_explained(run, tmp_path):
    data = copy.deepcopy(dict(Scan.load(run["scan"]).data))
    why = "Torch-Pruning could not build the channel dependency graph (<boom>)"
    data["pruning_graph"] = {"available": False, "reason": why}
    data["methods"]["prune"].update(unavailable=why, skipped={})
    data["results"] = [r for r in data["results"] if r["method"] != "prune"]
    doc = render_report(Scan(data), tmp_path).read_text()
    assert f"Channel dependency graph unavailable: {html.escape(why)}" in doc
    assert f"<td>prune</td><td>(every unit)</td><td>{html.escape(why)}</td>" in doc


def test_settings_run_from_weaker_to_stronger_whatever_the_file_order(run):
    from sensplan.reports._render import sensitivities

    data = copy.deepcopy(dict(Scan.load(run["scan"]).data))
    for info in data["methods"].values():
        info["settings"].reverse()
    data["results"].reverse()
    columns = {s.method: s.columns for s in sensitivities(Scan(data))}
    assert columns == {"prune": ["prune 25%", "prune 50%"], "weight_quant": ["int8", "int4"],
                       "sparsity": ["sparse 50%"]}


def test_everything_from_the_model_is_escaped(run, tmp_path):
    data = copy.deepcopy(dict(Scan.load(run["scan"]).data))
    data["model"]["spec"]["source"] = f"evil.py:{EVIL}"
    data["methods"]["weight_quant"]["skipped"][EVIL] = f"because {EVIL}"
    data["methods"]["weight_quant"]["description"] = f"does {EVIL}"
    row = dict(next(r for r in data["results"] if r["method"] == "weight_quant"))
    data["results"].append({**row, "unit": EVIL, "label": EVIL})
    data["layers"][EVIL] = dict(data["layers"][row["unit"]])
    doc = render_report(Scan(data), tmp_path).read_text()
    assert "<img src=x" not in doc and "&lt;img src=x onerror=" in doc
    assert "because &lt;img" in doc and "does &lt;img" in doc and doc.count("<script") == 1
    assert _is_png((tmp_path / "sensitivity_heatmap.png").read_bytes())


def test_metric_name_comes_from_the_task(run, tmp_path):
    data = copy.deepcopy(dict(Scan.load(run["scan"]).data))
    data["task"] = {"name": "agreement",
                    "metric": {"name": "agreement", "higher_is_better": True, "unit": "fraction"}}
    doc = render_report(Scan(data), tmp_path).read_text()
    assert "agreement drop in points" in doc and "top-1" not in doc


def test_missed_and_unmeasured_budgets_are_shown(run, tmp_path):
    result = tmp_path / "result"
    shutil.copytree(run["result"], result)
    path = result / "metrics.json"
    m = json.loads(path.read_text())
    assert [b["metric"] for b in m["budgets"]] == ["macs", "size"]
    m["budgets"][0]["met"] = False
    m["budgets"][1].update(met=None, note="a cost-table metric")
    path.write_text(json.dumps(m))  # the plan digest it records is unchanged: the chain holds
    doc = _render(run, tmp_path / "report", result=result)
    assert "<td class='bad'>MISSED</td>" in doc
    assert "not measured (a cost-table metric)" in doc


def test_a_solve_not_proven_optimal_says_so(run, tmp_path):
    plan = Plan.load(run["plan"])
    data = copy.deepcopy(dict(plan.data))
    data["solver"].update(status="time_limit", optimal=False)
    data["plans"]["planned"]["solver"].update(status="time_limit", optimal=False, gap=0.03)
    doc = render_report(run["scan"], tmp_path, plan=Plan(data)).read_text()
    assert doc.count("not proven optimal") == 2 and "time_limit" in doc


def test_a_broken_digest_chain_is_refused_unless_forced(run, tmp_path):
    # a scan that is not the one the plan was made from
    other = json.loads(run["scan"].read_text())
    other["provenance"]["started"] = "2000-01-01T00:00:00+00:00"
    other_scan = tmp_path / "other_scan.json"
    Scan(other).save(other_scan)
    with pytest.raises(ArtifactError) as e:
        render_report(other_scan, tmp_path / "a", plan=run["plan"])
    msg = str(e.value)
    assert str(other_scan) in msg and str(run["plan"]) in msg
    assert "pass --force to render anyway" in msg
    assert not (tmp_path / "a").exists()
    doc = render_report(other_scan, tmp_path / "a", plan=run["plan"], force=True).read_text()
    assert "<div class='warn'><b>Warning: the digest chain is broken</b>" in doc

    # results that applied another plan
    other_plan = make_plan(Scan.load(run["scan"]), [Budget.parse("macs=0.6")])
    other_plan = other_plan.save(tmp_path / "p2.json")
    with pytest.raises(ArtifactError, match="pass --force to render anyway") as e:
        render_report(run["scan"], tmp_path / "b", plan=other_plan.path, result=run["result"])
    assert str(run["result"] / "metrics.json") in str(e.value)
    assert str(other_plan.path) in str(e.value)
    doc = render_report(run["scan"], tmp_path / "b", plan=other_plan.path, result=run["result"],
                        force=True).read_text()
    assert "digest chain is broken" in doc and "uniform result" in doc


def test_an_unwritable_out_dir_is_a_user_error(run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (blocker, blocker / "report"):
        with pytest.raises(UserInputError, match="--out"):
            render_report(run["scan"], out, plan=run["plan"])


def test_a_missing_result_dir_is_an_artifact_error(run, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        render_report(run["scan"], tmp_path, plan=run["plan"], result=tmp_path / "nope")


def test_rendering_imports_no_torch(run, tmp_path):
    out = tmp_path / "report"
    code = textwrap.dedent(f"""
        import sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torch_pruning", "torchvision"):
                    raise ImportError("blocked in this test: " + name)
                return None

        sys.meta_path.insert(0, NoTorch())
        from sensplan.reports import render_report

        path = render_report({str(run["scan"])!r}, {str(out)!r}, plan={str(run["plan"])!r},
                             result={str(run["result"])!r})
        loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "torch_pruning")
                  or m.startswith("sensplan.sensitivity")]
        assert not loaded, loaded
        print("rendered", path)
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "rendered" in proc.stdout and (out / "report.html").is_file()


def test_the_verdict_leads_and_every_unit_is_in_one_sortable_table(run, tmp_path):
    doc = _render(run, tmp_path)
    p = Plan.load(run["plan"])
    verdict = doc.index("id='verdict'")
    assert verdict < doc.index("<h2>Goal</h2>") and "<b>Verdict:</b>" in doc
    # both allocations were applied on the same items: the verdict compares them pairwise
    assert "(paired SE)" in doc[verdict:doc.index("</p>", verdict)]
    table = doc[doc.index("<table id='units' class='sortable'>"):]
    table = table[:table.index("</table>")]
    assert "data-filter='units'" in doc
    for block, c in p.variant("planned")["choices"].items():
        assert f"<tr data-unit='{html.escape(c['unit'])}'>" in table, block
    # a unit a method skipped shows the reason on that method's axis, and only there
    s = Scan.load(run["scan"])
    for m, sk in s.skipped().items():
        axis = s.methods[m]["axis"]
        for u, why in sk.items():
            rows = [r for r in table.split("<tr")[1:] if f"data-unit='{html.escape(u)}'" in r]
            assert any(f"<td>{html.escape(axis)}</td>" in r and html.escape(why) in r for r in rows)
            assert not any(html.escape(why) in r for r in rows if f"<td>{html.escape(axis)}</td>" not in r)


def test_each_method_has_its_own_colour_scale_and_whole_column_labels(run):
    from sensplan.reports._render import _column_label, _Fmt, _heatmaps, sensitivities

    s = Scan.load(run["scan"])
    sens = sensitivities(s)
    doc = _heatmaps(sens, _Fmt(s.metric), {})
    tops = re.findall(r"<text x='[\d.]+' y='[\d.]+' font-size='10' text-anchor='start' fill='#222' "
                      r"font-weight='normal'>([\d.]+)</text><text", doc)
    assert len(tops) == len(sens)  # one legend per method
    worst = {x.method: float(np.nanmax(x.drops)) * 100 for x in sens}
    for x, top in zip(sens, tops, strict=True):
        assert float(top) >= worst[x.method]  # each legend reaches its own method's largest drop
    # a label shared up to a digit is cut at a word, not in the middle of a number
    assert _column_label(["prune 30% (10 ch)", "prune 30% (19 ch)"], "#2") == "prune 30%"
    assert _column_label(["int4", "int4"], "#0") == "int4"
    # every cell has its value on hover and its unit for a click
    assert doc.count("data-tip=") == sum(x.drops.size for x in sens)


def test_only_charts_that_apply_are_drawn(run):
    from sensplan.reports._render import _Fmt, fig_allocation, fig_curves, sensitivities

    s = Scan.load(run["scan"])
    data = copy.deepcopy(dict(Plan.load(run["plan"]).data))
    for alloc in data["plans"].values():  # a MACs-only plan: no block of the weight axis compresses
        for c in alloc["choices"].values():
            if c["axis"] != "channels":
                c.update(method=None, setting={}, label="none", effect={})
    sens = sensitivities(s)
    one_axis = fig_allocation(Plan(data), sens, list(s.methods))
    both = fig_allocation(Plan.load(run["plan"]), sens, list(s.methods))
    w1, w2 = Image.open(io.BytesIO(one_axis)).size[0], Image.open(io.BytesIO(both)).size[0]
    assert w1 < w2  # one panel fewer
    # a method scanned at a single setting draws no curve
    single = [x for x in sens if len(x.columns) == 1]
    assert single
    w, h = Image.open(io.BytesIO(fig_curves(single, _Fmt(s.metric)))).size
    assert w > 3 * h  # the one-line "nothing to draw" figure, not a panel with one point
    w, h = Image.open(io.BytesIO(fig_curves(sens, _Fmt(s.metric)))).size
    assert w < 3 * h


# -- the drop map: how a plan made on a signal predicts its drop ------------------------------------
def _section(doc: str, title: str) -> str:
    return doc.split(f"<h2>{title}</h2>", 1)[1].split("<h2>", 1)[0]


def _centre(group: str) -> tuple[float, float]:
    """The centre of a variant's square marker in the chart's coordinates."""
    x, y, w = (float(v) for v in re.search(r"<rect x='([\d.-]+)' y='([\d.-]+)' width='([\d.]+)'", group).groups())
    return x + w / 2, y + w / 2


def test_a_signal_plan_draws_its_map_the_probes_it_was_fitted_on_and_each_allocation(run, tmp_path):
    from sensplan.planner._signal import DropMap
    from sensplan.reports._render import _Fmt, drop_map_section, map_probes

    s, p = Scan.load(run["scan"]), Plan.load(run["plan"])
    obj = p.data["objective"]
    assert obj["signal"] == "kl"  # auto: the scan recorded the KL divergence
    probes = map_probes(s, p)
    assert len(probes) == sum(1 for r in s.results if not r.get("estimated")) > 2
    # the probes the report draws are the ones the planner fitted the map on: refitted, the same map
    refit = DropMap.fit("kl", [(r["signals"]["kl"]["value"], r["drop"]) for r in probes])
    np.testing.assert_allclose(np.array(refit.knots), np.array(obj["drop_map"]["knots"]))
    dmap = DropMap("kl", tuple(tuple(k) for k in obj["drop_map"]["knots"]))
    planned, uniform = p.variant("planned")["predicted"], p.variant("uniform")["predicted"]
    assert dmap(planned["signal_total"]) == pytest.approx(planned["drop"])  # the map at the solver's total
    # a uniform ratio between the scanned ones: its total counts each group's signal interpolated
    # between the scanned settings, and its drop is the map there too
    assert p.variant("uniform")["uniform"]["ratio"] not in [x["ratio"] for x in SETTINGS["prune"]]
    assert dmap(uniform["signal_total"]) == pytest.approx(uniform["drop"])
    drawn_at = {"planned": f"kl total {planned['signal_total']:.3g}",
                "uniform": f"kl total {uniform['signal_total']:.3g}"}

    doc = _render(run, tmp_path / "a")
    assert doc.index("<h2>Drop model</h2>") < doc.index("<h2>Verification</h2>")
    sec = _section(doc, "Drop model")
    assert sec.count("<svg class='chart'") == 1
    # one dot per fitting probe, its hover naming its signal value and measured drop
    assert sec.count("<g class='probe'") == len(probes)
    for r in probes:
        assert f"kl {r['signals']['kl']['value']:.3g}, drop {100 * r['drop']:.2f}" in sec
    assert f"fitted on the scan&#x27;s {len(probes)} measured probes" in sec
    # the map: one line, non-decreasing (SVG y grows downwards)
    assert sec.count("<polyline class='map'") == 1
    line = [tuple(map(float, xy.split(","))) for xy in
            re.search(r"<polyline class='map' points='([^']+)'", sec).group(1).split()]
    assert len(line) > 2 and all(a[0] <= b[0] and a[1] >= b[1] for a, b in zip(line[:-1], line[1:], strict=True))
    # a square per allocation at (its total, its predicted drop): on the map
    squares = re.findall(r"<g class='variant'.*?</g>", sec)
    assert len(squares) == 2 and "variant-measured" not in sec  # not verified: nothing measured
    for variant, g in zip(("planned", "uniform"), squares, strict=True):
        pred = p.variant(variant)["predicted"]
        assert f"{drawn_at[variant]}, predicted drop {100 * pred['drop']:.2f}" in g
        x, y = _centre(g)
        assert float(np.interp(x, [a for a, _ in line], [b for _, b in line])) == pytest.approx(y, abs=1.5)

    # verified: a star where verification measured an allocation (held-out), joined to its square
    data = copy.deepcopy(dict(p.data))
    data["plans"]["planned"]["verified"] = {"sample": None, "report": None, "candidate": "plan round 1",
                                            "held_out": {"drop": 0.0625, "drop_se": 0.02, "score": 0.9375, "n": 64}}
    sec = drop_map_section(s, Plan(data), _Fmt(s.metric))
    squares = re.findall(r"<g class='variant'.*?</g>", sec)
    stars = re.findall(r"<g class='variant-measured'.*?</g>", sec)
    assert len(squares) == 2 and len(stars) == 1  # the uniform allocation was not measured
    assert "measured drop 6.25 points (held-out), predicted" in stars[0]
    link = re.search(r"<line x1='([\d.]+)' y1='([\d.]+)' x2='([\d.]+)' y2='([\d.]+)' [^>]*stroke-dasharray='3 2'",
                     stars[0])
    x, y = _centre(squares[0])
    assert (float(link[1]), float(link[2])) == pytest.approx((x, y), abs=0.11)  # from the planned square ...
    # ... straight down to the star: it measured less than predicted
    assert p.variant("planned")["predicted"]["drop"] > 0.0625
    assert float(link[3]) == pytest.approx(x, abs=0.11) and float(link[4]) > y + 10
    assert "where verification measured it, the star is its measured drop" in sec

    # a probe at a signal of 0 cannot sit on the logarithmic axis: left out, and said so
    assert "(log scale)" in sec
    zeroed = copy.deepcopy(dict(s.data))
    zeroed["results"][0]["signals"]["kl"]["value"] = 0.0
    sec = drop_map_section(Scan(zeroed), p, _Fmt(s.metric))
    assert sec.count("<g class='probe'") == len(probes) - 1
    assert "logarithmic: 1 probe(s) with a value of 0 or less are left out" in sec

    # an older plan records no totals: the probes and the map, no allocation marked
    data = copy.deepcopy(dict(p.data))
    for alloc in data["plans"].values():
        del alloc["predicted"]["signal_total"]
    sec = drop_map_section(s, Plan(data), _Fmt(s.metric))
    assert sec.count("<g class='probe'") == len(probes) and "class='variant" not in sec
    assert "they are not marked" in sec


def test_the_map_of_a_plan_for_onnxruntime_is_drawn_on_the_options_it_was_fitted_on(run):
    """plan --runtime onnxruntime fits the map on the options ORT runs: the report draws those."""
    from sensplan.planner import Budget, make_plan
    from sensplan.planner._runtime import runtime_options
    from sensplan.planner._signal import DropMap
    from sensplan.reports._render import map_probes

    s = Scan.load(run["scan"])
    kept, dropped = runtime_options(s, "onnxruntime")
    assert dropped  # sparsity and a Conv's 4-bit weights have no ORT kernel
    made = make_plan(kept, [Budget.parse("size=0.5")])
    p = Plan({**made.data, "runtime": {"name": "onnxruntime", "not_offered": []}})
    probes = map_probes(s, p)
    assert probes and not {(d["unit"], d["method"], d["label"]) for d in dropped} & \
        {(r["unit"], r["method"], r["label"]) for r in probes}
    refit = DropMap.fit("kl", [(r["signals"]["kl"]["value"], r["drop"]) for r in probes])
    np.testing.assert_allclose(np.array(refit.knots), np.array(p.data["objective"]["drop_map"]["knots"]))


def test_a_plan_on_the_drop_itself_has_no_map(run, tmp_path):
    s = Scan.load(run["scan"])
    p = make_plan(s, [Budget.parse(b) for b in BUDGETS], signal="drop").save(tmp_path / "plan.json")
    assert p.data["objective"]["signal"] == "drop" and p.data["objective"]["drop_map"] is None
    pred = p.variant("planned")["predicted"]
    assert pred["signal_total"] == pytest.approx(pred["drop"])  # the signal is the drop: the map is the identity
    doc = render_report(run["scan"], tmp_path / "r", plan=p.path).read_text()
    assert "<h2>Drop model</h2>" not in doc and "class='probe'" not in doc and "class='map'" not in doc
    assert doc.count("<svg class='chart'") == len(s.methods)  # the heatmaps only


def test_a_fast_scans_map_is_drawn_on_its_map_points_only(tmp_path):
    model = seeded_model("tiny_convnet")
    data, calib = self_labelled(model, n=64), self_labelled(model, n=32, seed=1)
    settings = {"weight_quant": [{"bits": 8}, {"bits": 4}, {"bits": 2}], "act_quant": [{"calib": "minmax", "bits": 4}]}
    table = scan(model, data, ScanConfig(settings, fast=True, fast_measured=3), calib=calib,
                 progress=False).save(tmp_path / "scan.json")
    points = [r for r in table.results if r.get("map_point")]
    # activation quantization cannot be estimated: measured, but not a map point
    assert len(points) == 3 and any(not r.get("estimated") and not r.get("map_point") for r in table.results)
    p = make_plan(table, [Budget.parse("size=0.5")]).save(tmp_path / "plan.json")
    assert p.data["objective"]["signal"] == "fisher"
    sec = _section(render_report(table.path, tmp_path / "r", plan=p.path).read_text(), "Drop model")
    assert sec.count("<g class='probe'") == len(points)
    for r in points:  # at its estimate, with its measured drop
        assert f"fisher {r['signals']['fisher']['value']:.3g}, drop {100 * r['drop']:.2f}" in sec
    assert "the x values are Fisher estimates" in sec and f"fitted on the {len(points)} map points" in sec
    assert sec.count("<g class='variant'") == 2


def test_a_group_label_names_the_group_and_not_the_layer_whose_name_is_its_id(run, tmp_path):
    """A group's id is one of its layers' names (a transformer's heads group is named after its query
    projection): the group's label ("layer 0 heads") names the group unit, while a layer method's
    unit of the same name is shown by its own name, in the heatmaps and in the per-unit table."""
    from sensplan.reports._render import _Fmt, _heatmaps, display_names, sensitivities

    data = copy.deepcopy(dict(Scan.load(run["scan"]).data))
    quantized = {r["unit"] for r in data["results"] if r["method"] == "weight_quant"}
    gid = next(g for g in data["groups"] if g in quantized and any(
        r["unit"] == g and r["method"] == "prune" for r in data["results"]))
    data["groups"][gid]["label"] = "layer 0 heads"
    s = Scan(data)
    sens = {x.method: x for x in sensitivities(s)}
    names = display_names(s)
    prune_map = _heatmaps([sens["prune"]], _Fmt(s.metric), names)
    quant_map = _heatmaps([sens["weight_quant"]], _Fmt(s.metric), names)
    assert ">layer 0 heads</text>" in prune_map
    assert "layer 0 heads" not in quant_map and f">{html.escape(gid)}</text>" in quant_map
    (tmp_path / "scan.json").write_text(json.dumps(data))
    doc = render_report(tmp_path / "scan.json", tmp_path / "out", plan=run["plan"], force=True).read_text()
    table = doc[doc.index("<table id='units' class='sortable'>"):]
    rows = [r for r in table[:table.index("</table>")].split("<tr")[1:] if f"data-unit='{html.escape(gid)}'" in r]
    by_axis = {axis: r for r in rows for axis in ("channels", "weight") if f"<td>{axis}</td>" in r}
    assert "<td>layer 0 heads</td>" in by_axis["channels"]
    assert f"<td>{html.escape(gid)}</td>" in by_axis["weight"] and "layer 0 heads" not in by_axis["weight"]
