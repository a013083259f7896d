"""Scan and apply run on the device asked for; the CUDA test runs only where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from sensplan.planner import Budget, apply_plan, load_compressed, make_plan
from sensplan.sensitivity import ScanConfig, scan
from tests.conftest import seeded_model, self_labelled

CONFIG = ScanConfig({"prune": [{"ratio": 0.5}], "weight_quant": [{"bits": 4}],
                     "sparsity": [{"ratio": 0.5}], "act_quant": [{"calib": "minmax", "bits": 8}]})


def _pipeline(device: str, tmp_path) -> tuple[dict, dict]:
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, n=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = scan(model, data, CONFIG, calib=data, progress=False, device=device)
    plan = make_plan(table, [Budget.parse("size=0.4")])
    metrics = apply_plan(model, plan, data, tmp_path, calib=data, timing=False, device=device)
    # the user's model is neither changed nor moved
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu"
    return table.data, metrics


def test_explicit_cpu_device_records_it(tmp_path) -> None:
    table, metrics = _pipeline("cpu", tmp_path)
    assert table["provenance"]["device"] == "cpu"
    assert metrics["comparison"]["macs"]["ratio"] == pytest.approx(1.0)


def test_bfloat16_evaluation_runs_and_is_recorded() -> None:
    model = seeded_model("tiny_convnet")
    data = self_labelled(model, n=64)
    t32 = scan(model, data, ScanConfig({"weight_quant": [{"bits": 8}]}), progress=False)
    t16 = scan(model, data, ScanConfig({"weight_quant": [{"bits": 8}]}), progress=False,
               dtype=torch.bfloat16)
    assert t16.data["provenance"]["dtype"] == "bfloat16"
    # bfloat16 autocast changes a few predictions at most on a model labelled by itself
    assert abs(t16.baseline["score"] - t32.baseline["score"]) <= 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(tmp_path) -> None:
    cpu_table, cpu_metrics = _pipeline("cpu", tmp_path / "cpu")
    gpu_table, gpu_metrics = _pipeline("cuda", tmp_path / "cuda")
    assert gpu_table["provenance"]["device"].startswith("cuda")
    # same probes, same units; scores agree up to float differences between kernels
    assert len(gpu_table["results"]) == len(cpu_table["results"])
    for a, b in zip(cpu_table["results"], gpu_table["results"], strict=True):
        assert (a["unit"], a["method"]) == (b["unit"], b["method"])
        assert abs(a["drop"] - b["drop"]) <= 2 / 64
    for m in ("macs", "params", "size", "bops"):
        assert gpu_metrics["comparison"][m]["measured"] == cpu_metrics["comparison"][m]["measured"]
    model = load_compressed(tmp_path / "cuda" / "model.sensplan", seeded_model("tiny_resnet"))
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_prefix_cache_and_workers_give_the_plain_scans_rows() -> None:
    from sensplan.sensitivity import ModelSpec

    model = seeded_model("tiny_resnet")
    data, calib = self_labelled(model, n=96), self_labelled(model, n=32, seed=5)
    keys = ("unit", "method", "setting", "score", "drop", "lost", "gained")

    def rows(**kw):
        t = scan(model, data, ScanConfig(CONFIG.settings, **kw.pop("cfg", {})), calib=calib, progress=False,
                 device="cuda", model_spec=ModelSpec("sensplan:tiny_resnet"), **kw)
        return [{k: r[k] for k in keys} for r in t.results], t.data["provenance"]["prefix_cache"]

    plain, _ = rows(cfg={"cache_mb": 0})
    cached, record = rows()
    assert record["used"] and cached == plain
    spread, _ = rows(workers=2)
    assert spread == plain
