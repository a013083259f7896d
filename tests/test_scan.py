"""The scan: reversible probes, every unit and setting covered, schema v2 rows, errors explained."""

from __future__ import annotations

import pytest
import torch

from sensplan import UserInputError
from sensplan.sensitivity import Scan, ScanConfig, scan
from sensplan.sensitivity._models import weights_digest
from sensplan.sensitivity.tasks import paired_se
from tests.conftest import seeded_model, self_labelled

ROW_KEYS = {"unit", "method", "axis", "setting", "label", "level", "effect", "score", "loss",
            "drop", "drop_se", "lost", "gained", "loss_increase", "signals", "seconds"}


@pytest.fixture(scope="module")
def resnet_scan():
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 64)
    cfg = ScanConfig.of(bits=(8, 4, 2), ratios=(0.25, 0.5, 0.75))
    return model, data, scan(model, data, cfg, progress=False)


def test_weights_digest_reads_bfloat16_weights():
    """numpy has no bfloat16: the digest reads the bytes, and sees a change to one of them."""
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    before = weights_digest(model)
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert weights_digest(model) != before


def test_scan_leaves_the_model_bit_identical_with_recalibration(tiny_resnet):
    data = self_labelled(tiny_resnet, 64)
    calib = self_labelled(tiny_resnet, 32, seed=5)
    before = weights_digest(tiny_resnet)
    state = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    with torch.no_grad():
        y0 = tiny_resnet(data.x)
    cfg = ScanConfig({"prune": [{"ratio": 0.5}], "weight_quant": [{"bits": 2}],
                      "sparsity": [{"ratio": 0.9}], "act_quant": [{"calib": "minmax", "bits": 8}]})
    table = scan(tiny_resnet, data, cfg, calib=calib, progress=False)
    assert weights_digest(tiny_resnet) == before
    after = tiny_resnet.state_dict()
    assert list(after) == list(state)
    for k, v in after.items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    assert not tiny_resnet.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny_resnet.modules())
    with torch.no_grad():
        assert torch.equal(tiny_resnet(data.x), y0)
    assert table.data["config"]["bn_recalibration"] is True
    assert table.data["calibration"]["n"] == 32
    # the probes did perturb the model: the strongest settings cost predictions
    assert max(r["drop"] for r in table.results) > 0


def test_scan_covers_every_unit_and_setting(resnet_scan):
    _, _, table = resnet_scan
    assert table.baseline["score"] == 1.0 and table.baseline["n"] == 64
    assert set(table.methods) == {"prune", "weight_quant"}
    scanned = set(table.scanned_groups())
    assert scanned == {"stem.0", "block.conv1", "down.0"}
    assert set(table.skipped_groups()) == {"head"}
    assert "output shape" in table.skipped_groups()["head"]
    assert table.skipped() == {"prune": {"head": table.skipped_groups()["head"]},
                               "weight_quant": {}}
    for gid in scanned:
        rows = table.results_for(gid, "prune")
        channels = table.groups[gid]["channels"]
        assert [r["setting"]["n_remove"] for r in rows] == \
            [round(f * channels) for f in (0.25, 0.5, 0.75)]
        assert [r["setting"]["ratio"] for r in rows] == [0.25, 0.5, 0.75]
        assert all(r["axis"] == "channels" and r["effect"] == {"removed": r["setting"]["n_remove"]}
                   for r in rows)
    assert set(table.layers) == {"stem.0", "block.conv1", "block.conv2", "down.0", "head"}
    for layer in table.layers:
        rows = table.results_for(layer, "weight_quant")
        assert [r["setting"] for r in rows] == [{"bits": 8}, {"bits": 4}, {"bits": 2}]
        assert [r["label"] for r in rows] == ["int8", "int4", "int2"]
        assert [r["level"] for r in rows] == sorted(r["level"] for r in rows)
        assert rows[1]["effect"] == {"weight_bits": 4, "weight_dtype": "int", "scale_bits": 32}
        assert all(r["axis"] == "weight" for r in rows)
    assert len(table.results) == 3 * 3 + 5 * 3
    # the drops are real measurements: heavy pruning of the residual stream changes predictions
    assert max(r["drop"] for r in table.results_for("stem.0", "prune")) > 0.05
    for r in table.results:
        assert set(r) == ROW_KEYS
        assert r["drop"] == pytest.approx(table.baseline["score"] - r["score"])
        assert r["loss_increase"] == pytest.approx(r["loss"] - table.baseline["loss"])
        # the low-noise signals: the loss signal is the loss increase, KL is never negative
        assert set(r["signals"]) == {"loss", "kl", "margin"}
        assert r["signals"]["loss"]["value"] == pytest.approx(r["loss_increase"], abs=1e-6)
        assert r["signals"]["kl"]["value"] >= 0 and r["signals"]["kl"]["se"] >= 0


def test_scan_records_how_each_tensor_shrinks(resnet_scan):
    model, _, table = resnet_scan
    shrinks = {k: t["shrinks"] for k, t in table.tensors.items() if t["shrinks"]}
    # block.conv1's group: its own output channels, its BatchNorm, block.conv2's inputs
    for key in ("block.conv1.weight", "block.bn1.weight", "block.bn1.bias",
                "block.bn1.running_mean", "block.bn1.running_var"):
        assert shrinks[key]["block.conv1"] == {"0": 1.0}, key
    assert shrinks["block.conv2.weight"]["block.conv1"] == {"1": 1.0}
    # the residual stream (stem.0) runs through the stem, the block's output and down.0's input
    assert shrinks["block.conv2.weight"]["stem.0"] == {"0": 1.0}
    assert shrinks["down.0.weight"]["stem.0"] == {"1": 1.0}
    # down.0's channels feed the head through global pooling: one input per channel
    assert shrinks["head.weight"] == {"down.0": {"1": 1.0}}
    sd = model.state_dict()
    for k, t in table.tensors.items():
        assert t["shape"] == list(sd[k].shape)
        assert t["storage_bits"] == sd[k].element_size() * 8
    assert table.tensors["stem.1.running_mean"]["kind"] == "buffer"
    assert table.tensors["head.weight"]["layer"] == "head"
    assert table.data["pruning_graph"] == {"available": True, "reason": ""}


def test_scan_records_provenance_and_round_trips(tmp_path, tiny_convnet):
    data = self_labelled(tiny_convnet, 32)
    table = scan(tiny_convnet, data, ScanConfig.of(bits=(4,), ratios=(0.5,)), progress=False)
    table.save(tmp_path / "scan.json")
    loaded = Scan.load(tmp_path / "scan.json")
    prov = loaded.data["provenance"]
    assert prov["seconds"] > 0
    assert "torch" in prov["versions"] and "torch_pruning" in prov["versions"]
    assert prov["device"] == "cpu" and prov["dtype"] == "float32"
    assert loaded.data["model"]["architecture_digest"]
    assert loaded.data["model"]["input_shape"] == [3, 8, 8] and loaded.data["model"]["outputs"] == 4
    assert loaded.data["data"]["n"] == 32
    assert loaded.data["task"]["name"] == "classification"
    assert loaded.data["task"]["metric"] == {"name": "top1", "higher_is_better": True, "unit": "fraction"}
    assert set(loaded.data["task"]["signals"]) == {"loss", "kl", "margin"}
    assert loaded.data["config"]["settings"] == {"prune": [{"ratio": 0.5}],
                                                 "weight_quant": [{"bits": 4}]}
    assert loaded.results == table.results


def test_tiny_groups_without_a_removable_ratio_are_skipped_with_a_reason():
    model = seeded_model("tiny_convnet", width=2)
    data = self_labelled(model, 16)
    table = scan(model, data, ScanConfig.of(bits=(8,), ratios=(0.1,)), progress=False)
    reasons = table.skipped_groups()
    assert "0" in reasons and "no scanned ratio removes a channel" in reasons["0"]
    assert table.results_for("0", "prune") == []
    assert table.methods["prune"]["skipped"] == reasons


def test_without_a_pruning_graph_the_scan_goes_on_with_the_layer_methods(monkeypatch, tiny_convnet):
    import sensplan.sensitivity._scan as scan_module

    def untraceable(*args, **kwargs):
        raise RuntimeError("cannot trace this\nsecond line")

    monkeypatch.setattr(scan_module, "channel_graph", untraceable)
    data = self_labelled(tiny_convnet, 16)
    table = scan(tiny_convnet, data, ScanConfig.of(bits=(4,), ratios=(0.5,)), progress=False)
    graph = table.data["pruning_graph"]
    assert graph["available"] is False
    assert "RuntimeError: cannot trace this)" in graph["reason"]
    assert table.methods["prune"]["unavailable"] == graph["reason"]
    assert table.groups == {} and table.results_for("0", "prune") == []
    assert {r["method"] for r in table.results} == {"weight_quant"}
    assert len(table.results) == len(table.layers)


def test_scan_config_normalises_its_settings():
    cfg = ScanConfig({"weight_quant": [{"bits": 2}, {"bits": 8}, {"bits": 2}],
                      "half": [{"dtype": "bf16"}, {"dtype": "fp16"}]})
    assert cfg.settings == {"weight_quant": ({"bits": 8}, {"bits": 2}),
                            "half": ({"dtype": "float16"}, {"dtype": "bfloat16"})}
    assert ScanConfig.of(bits=(4,), ratios=()).settings == {"weight_quant": ({"bits": 4},)}
    assert set(ScanConfig().settings) == {"prune", "weight_quant"}  # the default methods
    assert ScanConfig(**{k: v for k, v in cfg.to_dict().items()}) == cfg


@pytest.mark.parametrize("make,fragment", [
    (lambda: ScanConfig.of(ratios=(0.5, 1.2)),
     "Bad setting for prune: The 'ratio' setting of prune must be a fraction in (0, 1), e.g. "
     "prune=0.5. Got 1.2"),
    (lambda: ScanConfig.of(bits=(16,)), "The 'bits' setting of weight_quant must be one of"),
    (lambda: ScanConfig({"weight_qunt": [{"bits": 4}]}), "Did you mean 'weight_quant'?"),
    (lambda: ScanConfig({}), "has no method to run"),
    (lambda: ScanConfig({"prune": []}), "'prune' has no settings to scan"),
    (lambda: ScanConfig.of(task="clasification"), "Did you mean 'classification'?"),
    (lambda: ScanConfig.of(batch_size=0), "batch size must be a positive integer"),
])
def test_bad_scan_settings_are_explained(make, fragment):
    with pytest.raises(UserInputError) as e:
        make()
    assert fragment in str(e.value)


def test_paired_standard_error_from_prediction_flips():
    base = torch.tensor([1.0] * 80 + [0.0] * 20)
    probe = base.clone()
    probe[:6] = 0.0  # six right -> wrong
    probe[80:82] = 1.0  # two wrong -> right
    lost, gained, se = paired_se(base, probe)
    assert (lost, gained) == (6, 2)
    assert se == pytest.approx((8 - 16 / 100) ** 0.5 / 100)  # McNemar's paired formula
    assert paired_se(base, base) == (0, 0, 0.0)


def test_scan_rows_carry_their_standard_error(resnet_scan):
    _, data, table = resnet_scan
    n = len(data)
    for r in table.results:
        assert r["lost"] - r["gained"] == round(r["drop"] * n)
        flips = r["lost"] + r["gained"]
        assert r["drop_se"] == pytest.approx(
            max(0.0, flips - (r["lost"] - r["gained"]) ** 2 / n) ** 0.5 / n)


def test_scan_config_defaults_takes_each_methods_default_settings():
    from sensplan.sensitivity import get_method

    assert ScanConfig.defaults().settings == ScanConfig().settings
    config = ScanConfig.defaults(["sparsity", "act_quant"], task="agreement")
    assert set(config.settings) == {"sparsity", "act_quant"} and config.task == "agreement"
    for name, settings in config.settings.items():
        method = get_method(name)
        assert list(settings) == sorted((method.check_setting(s) for s in method.default_settings),
                                        key=method.level)
    with pytest.raises(UserInputError, match="sparsty"):
        ScanConfig.defaults(["sparsty"])


def _bn1d_model_and_calib(n: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    from sensplan.sensitivity import EvalSet

    return model, EvalSet(torch.randn(n, 4), torch.zeros(n, dtype=torch.long), ["a", "b", "c"], {})


def test_batchnorm_statistics_fold_a_last_batch_of_one_sample_into_the_one_before():
    # 257 = 256 + 1: torch refuses a BatchNorm1d batch of one sample in training mode
    from sensplan.sensitivity import batchnorm_statistics

    model, calib = _bn1d_model_and_calib(257)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mean, var = batchnorm_statistics(model, calib)["2"]
    with torch.no_grad():
        h = model[1](calib.x)
    torch.testing.assert_close(mean, h.mean(0))
    torch.testing.assert_close(var, h.var(0, unbiased=True))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())


def test_batchnorm_statistics_of_one_sample_per_channel_name_the_layer_and_the_flags():
    from sensplan.sensitivity import batchnorm_statistics

    model, calib = _bn1d_model_and_calib(1)
    with pytest.raises(UserInputError, match=r"cannot measure 2: it sees one value per channel.*"
                                             r"--calib-samples.*--no-bn-recalibration"):
        batchnorm_statistics(model, calib)
    assert not any(m.training for m in model.modules())
    assert model[2]._forward_pre_hooks == {}
