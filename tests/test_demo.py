import json

from sensplan.cli import main


def test_demo_runs_end_to_end_offline(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--epochs", "1", "--no-timing"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = tmp_path / "report" / "report.html"
    assert f"report: {report}" in out.out
    assert report.is_file() and (tmp_path / "report" / "allocation.png").is_file()
    scan = json.loads((tmp_path / "scan.json").read_text())
    assert scan["baseline"]["score"] > 0.9  # the demo trains a real model
    assert scan["groups"]["head"]["status"] == "skipped"
    stream = scan["groups"]["stem.0"]
    assert stream["status"] == "scanned" and {"stem.0", "block.conv2"} <= {m[0] for m in stream["members"]}
    for variant_dir in (tmp_path / "result", tmp_path / "result" / "uniform"):
        m = json.loads((variant_dir / "metrics.json").read_text())
        assert m["budgets"][0]["met"]
        assert m["after"]["macs"] <= 0.5 * m["before"]["macs"]
        assert m["fine_tune"]["history"]
        assert m["after"]["score"] > 0.8
