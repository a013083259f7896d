import json

import pytest

from sensplan import ArtifactError
from sensplan.planner import Budget, Plan, make_plan
from sensplan.sensitivity import Scan
from tests.tables import synthetic_scan


def test_plan_round_trip_lists_every_unit(tmp_path):
    scan = synthetic_scan().save(tmp_path / "scan.json")
    plan = make_plan(Scan.load(tmp_path / "scan.json"), [Budget.parse("size=0.4")])
    saved = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.data == json.loads(json.dumps(plan.data))
    assert loaded.sha256 == saved.sha256
    planned = loaded.variant("planned")
    assert set(planned["prune"]) == set(scan.groups)  # skipped groups listed too
    assert planned["prune"]["head"]["status"] == "skipped" and planned["prune"]["head"]["n_remove"] == 0
    assert set(planned["quantize"]) == set(scan.layers)
    assert loaded.data["scan"]["sha256"] == scan.sha256
    assert planned["predicted"]["size"] <= 0.4 * loaded.original["size"] * (1 + 1e-9)
    assert loaded.variant("uniform")["uniform"]["bits"] in (32, 8, 4)


def test_plan_of_wrong_version_is_refused(tmp_path):
    plan = make_plan(synthetic_scan(), [Budget.parse("macs=0.7")])
    data = dict(plan.data, schema_version=99)
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        Plan.load(tmp_path / "p.json")


def test_scan_file_is_not_a_plan(tmp_path):
    synthetic_scan().save(tmp_path / "scan.json")
    with pytest.raises(ArtifactError, match="is not a sensplan.plan file"):
        Plan.load(tmp_path / "scan.json")


def test_scan_round_trip(tmp_path):
    scan = synthetic_scan()
    saved = scan.save(tmp_path / "scan.json")
    loaded = Scan.load(tmp_path / "scan.json")
    assert loaded.data == json.loads(json.dumps(scan.data))
    assert loaded.sha256 == saved.sha256
    assert loaded.skipped_groups() == {"head": "output layer"}


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "plan.json"
    target.write_text("old")
    plan = make_plan(synthetic_scan(), [Budget.parse("macs=0.7")])
    import sensplan._artifacts as art

    def broken(obj):
        raise RuntimeError("disk full")

    monkeypatch.setattr(art, "dumps", broken)
    with pytest.raises(RuntimeError):
        plan.save(target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
