"""The model zoo's fast subset: one torchvision model per family through scan -> plan -> apply at a
tiny input (``bench/zoo.py`` runs them all and writes docs/zoo.md).

Each model must complete: unsafe channel groups skipped with a reason, pruning marked unavailable
with the reason where Torch-Pruning cannot trace the model, and the applied model's MACs and
parameters equal to the plan's prediction after saving and reloading it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _zoo():
    spec = importlib.util.spec_from_file_location("sensplan_bench_zoo", ROOT / "bench" / "zoo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo = _zoo()

FAST = [
    "resnet18",            # residual streams
    "squeezenet1_1",       # concatenations (fire modules)
    "mobilenet_v3_small",  # depthwise convs, squeeze-excitation, hardswish
    "regnet_x_400mf",      # grouped convolutions
    "mnasnet0_5",          # reloading needs the state dict's _metadata
    "shufflenet_v2_x0_5",  # Torch-Pruning cannot build the graph: pruning unavailable
]
# heavier families (the whole zoo, swin and maxvit included, is bench/zoo.py's job)
SLOW = ["googlenet", "efficientnet_b0", "vit_b_32", "convnext_tiny", "timm:convnext_atto"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these small models at 32 px are slower with two on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check(rec: dict) -> None:
    assert rec["status"] == "completed", (rec.get("error"), rec.get("traceback"))
    planned = rec["apply"]["planned"]
    for cost in ("macs", "params"):
        assert planned[cost]["measured"] == pytest.approx(planned[cost]["predicted"], rel=1e-9), cost
    assert planned["reload_max_abs_diff"] <= 1e-4
    assert all(kind for kind, _ in rec["skip_reasons"])
    assert not any("e.g. a zero-padding shortcut" in kind for kind, _ in rec["skip_reasons"])


@pytest.mark.parametrize("name", FAST)
def test_family_completes(name):
    rec = zoo.run_model(name, px=32, samples=4, variants=("planned",), plan_time_limit=5.0)
    _check(rec)
    if name == "shufflenet_v2_x0_5":
        assert rec["groups"] == 0 and "could not build the channel dependency graph" in rec["pruning_unavailable"]
        assert rec["probes"] > 0  # the quantization scan went on
    else:
        assert rec["pruning_unavailable"] is None
        # every group is scanned but the classifier's (RegNet: the grouped convs' groups included)
        assert rec["groups_scanned"] == rec["groups"] - 1, rec["skip_reasons"]
        assert rec["apply"]["planned"]["macs_fraction"] < 1.0  # the plan pruned for real


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")  # googlenet
@pytest.mark.parametrize("name", SLOW)
def test_family_completes_slow(name):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    _check(zoo.run_model(name, samples=4, variants=("planned",), plan_time_limit=5.0))


def test_skip_reasons_are_counted_without_names_or_numbers():
    reason = ("structural pruning of this group breaks the model (RuntimeError: shapes (392x269 and "
              "384x1152)). Likely cause: its channels pass through operations Torch-Pruning does not map "
              "channel by channel (reshape, permute, roll). The group is not scanned or pruned.")
    assert zoo.reason_kind(reason) == ("pruning breaks the model: its channels pass through operations "
                                      "Torch-Pruning does not map channel by channel (reshape, permute, roll)")
    assert zoo.reason_kind("pruning this group changes the model's output shape (8, 10) -> (8, 5): it "
                           "produces the model's outputs.").startswith("produces the model's outputs")


def test_the_time_limit_counts_the_models_cpu_time(monkeypatch):
    """A model is killed at ``--time-limit`` CPU seconds (not wall seconds: a model waiting for a
    shared CPU is not killed for it), and the record says where it was."""
    import argparse

    monkeypatch.setattr(zoo, "WALL_FACTOR", 1000)  # however busy the machine, the CPU limit acts first

    args = argparse.Namespace(samples=4, ratios="0.5", bits="4", variants="planned", threads=1,
                              time_limit=1.0, memory_limit=8.0)
    rec = zoo.run_isolated("resnet18", args)
    assert rec["status"] == "timeout" and rec["error"].startswith("killed at the CPU-time limit")
    assert 1.0 <= rec["cpu_seconds"] < 10.0 and rec["wall_seconds"] >= rec["cpu_seconds"] / 2
