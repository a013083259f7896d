import base64
import copy
import re

from sensplan.planner import Budget, make_plan
from sensplan.reports import FIGURES, render_report
from sensplan.sensitivity import Scan
from tests.tables import synthetic_scan

EVIL = '<img src=x onerror="alert(1)">'


def _evil_scan() -> Scan:
    """A scan whose unit names carry HTML: a model's module names are user data."""
    data = copy.deepcopy(dict(synthetic_scan().data))
    data["groups"][EVIL] = {"channels": 4, "members": [], "status": "skipped", "reason": f"because {EVIL}"}
    data["model"] = {"spec": {"source": f"evil.py:{EVIL}", "kwargs": {}}}
    return Scan(data)


def test_report_is_self_contained_and_escaped(tmp_path):
    scan = _evil_scan()
    plan = make_plan(scan, [Budget.parse("size=0.4")])
    path = render_report(scan, tmp_path, plan=plan)
    doc = path.read_text()
    assert EVIL not in doc and "&lt;img src=x onerror=" in doc
    assert "<script" not in doc
    # no external resources: every image is embedded and decodes as PNG
    srcs = re.findall(r'src="([^"]+)"', doc)
    assert len(srcs) == len(FIGURES) - 1  # before/after is an HTML table on the page, a PNG beside it
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(href|src)="https?:', doc)
    for name in FIGURES:
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "Skipped channel groups" in doc and "because &lt;img" in doc


def test_report_from_a_scan_alone(tmp_path):
    path = render_report(synthetic_scan(), tmp_path)
    doc = path.read_text()
    assert "Sensitivity" in doc and "Allocation" not in doc
    assert (tmp_path / "sensitivity_heatmap.png").is_file() and not (tmp_path / "allocation.png").exists()
