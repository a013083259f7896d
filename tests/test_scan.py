import pytest
import torch

from sensplan.sensitivity import Scan, ScanConfig, scan
from sensplan.sensitivity._models import weights_digest
from tests.conftest import seeded_model, self_labelled


def test_scan_leaves_the_model_bit_identical_with_recalibration(tiny_resnet):
    data = self_labelled(tiny_resnet, 64)
    calib = self_labelled(tiny_resnet, 32, seed=5)
    before = weights_digest(tiny_resnet)
    buffers = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    table = scan(tiny_resnet, data, ScanConfig(bits=(8, 2), ratios=(0.25, 0.5)), calib=calib, progress=False)
    assert weights_digest(tiny_resnet) == before
    for k, v in tiny_resnet.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    assert not tiny_resnet.training
    assert table.data["config"]["bn_recalibration"] is True


def test_scan_covers_every_unit_and_setting(tiny_resnet):
    data = self_labelled(tiny_resnet, 64)
    cfg = ScanConfig(bits=(8, 4, 2), ratios=(0.25, 0.5, 0.75))
    table = scan(tiny_resnet, data, cfg, progress=False)
    assert table.baseline["top1"] == 1.0
    scanned = set(table.scanned_groups())
    assert scanned == {"stem.0", "block.conv1", "down.0"}
    assert set(table.skipped_groups()) == {"head"}
    for gid in scanned:
        rows = table.results_for(gid, "prune")
        assert [r["n_remove"] for r in rows] == [2, 4, 6] or [r["n_remove"] for r in rows] == [4, 8, 12]
    assert set(table.layers) == {"stem.0", "block.conv1", "block.conv2", "down.0", "head"}
    for layer in table.layers:
        assert [r["bits"] for r in table.results_for(layer, "quantize")] == [8, 4, 2]
    # the drops are real measurements: heavy pruning of the residual stream changes predictions
    worst = max(r["drop"] for r in table.results_for("stem.0", "prune"))
    assert worst > 0.05
    for r in table.results:
        assert r["drop"] == pytest.approx(table.baseline["top1"] - r["top1"])


def test_scan_records_provenance_and_round_trips(tmp_path, tiny_convnet):
    data = self_labelled(tiny_convnet, 32)
    table = scan(tiny_convnet, data, ScanConfig(bits=(4,), ratios=(0.5,)), progress=False)
    table.save(tmp_path / "scan.json")
    loaded = Scan.load(tmp_path / "scan.json")
    prov = loaded.data["provenance"]
    assert prov["seconds"] > 0 and "torch" in prov["versions"] and "torch_pruning" in prov["versions"]
    assert loaded.data["model"]["architecture_digest"]
    assert loaded.data["data"]["n"] == 32
    assert loaded.results == table.results


def test_tiny_groups_without_a_removable_ratio_are_skipped_with_a_reason():
    model = seeded_model("tiny_convnet", width=2)
    data = self_labelled(model, 16)
    table = scan(model, data, ScanConfig(bits=(8,), ratios=(0.1,)), progress=False)
    reasons = table.skipped_groups()
    assert any("no scanned ratio" in r for r in reasons.values())


def test_bad_scan_settings_are_explained():
    from sensplan import UserInputError

    with pytest.raises(UserInputError, match="ratios"):
        ScanConfig(ratios=(0.5, 1.2))
    with pytest.raises(UserInputError, match="bits"):
        ScanConfig(bits=(16,))


def test_paired_standard_error_from_prediction_flips():
    from sensplan.sensitivity._eval import paired_drop_se

    base = torch.tensor([True] * 80 + [False] * 20)
    probe = base.clone()
    probe[:6] = False  # six right -> wrong
    probe[80:82] = True  # two wrong -> right
    lost, gained, se = paired_drop_se(base, probe)
    assert (lost, gained) == (6, 2)
    assert se == pytest.approx((8 - 16 / 100) ** 0.5 / 100)
    assert paired_drop_se(base, base) == (0, 0, 0.0)


def test_scan_rows_carry_their_standard_error(tiny_resnet):
    data = self_labelled(tiny_resnet, 64)
    table = scan(tiny_resnet, data, ScanConfig(bits=(2,), ratios=(0.75,)), progress=False)
    for r in table.results:
        assert r["lost"] - r["gained"] == round(r["drop"] * 64)
        assert r["drop_se"] >= 0
