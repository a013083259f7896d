"""The pipeline on the real ResNet-20 and CIFAR-10 JPEG test set in ../shared (skipped without)."""

import json

import pytest

from sensplan.cli import main
from tests.conftest import CIFAR_RESNET, CIFAR_TEST, RESNET20_JPEG, RESNET20_ORIG, needs_shared

pytestmark = [needs_shared, pytest.mark.shared, pytest.mark.slow]


def test_resnet20_scan_plan_apply_at_half_the_macs(tmp_path, capsys):
    model = ["--model", f"{CIFAR_RESNET}:resnet20", "--weights", str(RESNET20_JPEG),
             "--data", str(CIFAR_TEST), "--samples", "500", "--calib-samples", "256"]
    code = main(["run", *model, "--bits", "8,4", "--ratios", "0.3,0.6", "--budget", "macs=0.5",
                 "--variants", "planned", "--no-timing", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    scan = json.loads((tmp_path / "scan.json").read_text())
    assert (scan["format"], scan["schema_version"]) == ("sensplan.scan", 2)
    skipped = {g: v["reason"] for g, v in scan["groups"].items() if v["status"] == "skipped"}
    # the zero-padding shortcuts merge the residual streams into one group: found and skipped
    assert "conv1" in skipped and "breaks the model" in skipped["conv1"]
    assert len(scan["groups"]["conv1"]["members"]) > 20
    assert "linear" in skipped
    assert scan["methods"]["prune"]["skipped"] == skipped
    scanned = [g for g, v in scan["groups"].items() if v["status"] == "scanned"]
    assert sorted(scanned) == sorted(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))
    assert scan["baseline"]["score"] > 0.8 and scan["baseline"]["n"] == 500
    assert len(scan["results"]) == 9 * 2 + len(scan["layers"]) * 2  # two ratios, two bit widths
    metrics = json.loads((tmp_path / "result" / "metrics.json").read_text())
    assert metrics["after"]["macs"] <= 0.5 * metrics["before"]["macs"]
    for metric in ("macs", "params", "bops"):
        assert metrics["comparison"][metric]["ratio"] == 1.0, metric
    assert metrics["budgets"][0]["met"]
    assert metrics["after"]["score"] < metrics["before"]["score"]
    assert "skipped" in (tmp_path / "report" / "report.html").read_text()


def test_original_checkpoint_with_module_prefix_and_old_buffers_loads():
    if not RESNET20_ORIG.is_file():
        pytest.skip("resnet20.th is not in ../shared")
    import torch

    from sensplan.sensitivity import ModelSpec, load_model

    model = load_model(ModelSpec(f"{CIFAR_RESNET}:resnet20"), RESNET20_ORIG)
    assert sum(p.numel() for p in model.parameters()) == 269722
    # the weights really came from the file: the first conv equals the checkpoint's
    raw = torch.load(RESNET20_ORIG, map_location="cpu", weights_only=True)
    raw = raw.get("state_dict", raw)
    assert torch.equal(model.conv1.weight, raw["module.conv1.weight"])
