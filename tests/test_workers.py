"""Probes spread over worker processes (``scan --workers``) and Ray actors (``--ray``): the table is
the single-process scan's, a killed worker's probes are retried, and a killed scan resumes."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

from sensplan.sensitivity import EvalSet, ModelSpec, ScanConfig, WeightMethod, scan
from tests.conftest import registered, seeded_model, self_labelled

COMPARED = ("unit", "method", "setting", "score", "loss", "drop", "drop_se", "lost", "gained",
            "loss_increase", "signals")
SPEC = ModelSpec("sensplan:tiny_resnet")


def rows(table):
    return [{k: r.get(k) for k in COMPARED} for r in table.results]


@pytest.fixture
def one_thread():
    """The main process on one thread, as each of two workers on two cores is: float sums that
    torch splits over threads then add up in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def setup():
    model = seeded_model("tiny_resnet")
    return model, self_labelled(model, 96), self_labelled(model, 32, seed=5)


CFG = ScanConfig({"prune": [{"ratio": 0.25}, {"ratio": 0.5}], "weight_quant": [{"bits": 4}, {"bits": 2}]},
                 batch_size=48)


def test_two_workers_give_the_single_process_table():
    model, data, calib = setup()
    single = scan(model, data, CFG, calib=calib, model_spec=SPEC, progress=False)
    spread = scan(model, data, CFG, calib=calib, model_spec=SPEC, progress=False, workers=2)
    assert rows(spread) == rows(single)
    assert spread.data["provenance"]["workers"] == {"workers": 2, "backend": "processes", "chunks_retried": 0}


def test_workers_resume_from_the_journal_and_write_every_row_to_it(tmp_path, one_thread):
    model, data, calib = setup()
    journal = tmp_path / "scan.json.journal"
    half = ScanConfig({"weight_quant": [{"bits": 4}]}, batch_size=48)
    scan(model, data, half, calib=calib, model_spec=SPEC, progress=False, journal=journal)
    spread = scan(model, data, CFG, calib=calib, model_spec=SPEC, progress=False, journal=journal, workers=2)
    prov = spread.data["provenance"]
    assert prov["probes_from_journal"] == sum(r["method"] == "weight_quant" and r["setting"]["bits"] == 4
                                              for r in spread.results)
    again = scan(model, data, CFG, calib=calib, model_spec=SPEC, progress=False, journal=journal, workers=2)
    assert again.data["provenance"]["probes_from_journal"] == len(again.results)
    assert rows(again) == rows(spread) == rows(scan(model, data, CFG, calib=calib, progress=False))


class DieOnce(WeightMethod):
    """Rounds weights to 3 bits; the first probe in a worker process kills that process (once: a
    marker file says it happened)."""

    name = "die_once"
    axis = "weight"
    stage = 30
    default_settings = ({"marker": ""},)
    setting_key = "marker"

    def check_setting(self, setting):
        return {"marker": str(setting.get("marker", ""))}

    def label(self, setting):
        return "die once"

    def effect(self, setting, unit):
        return {"weight_bits": 3}

    def transform(self, ctx, layer, w, setting):
        marker = setting["marker"]
        if os.environ.get("SENSPLAN_TEST_MAIN") != str(os.getpid()) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        scale = w.abs().amax() / 3
        return torch.round(w / scale).clamp(-3, 3) * scale


@contextmanager
def main_pid():
    os.environ["SENSPLAN_TEST_MAIN"] = str(os.getpid())
    try:
        yield
    finally:
        del os.environ["SENSPLAN_TEST_MAIN"]


def test_a_killed_worker_is_replaced_and_its_probes_measured_again(tmp_path, one_thread):
    model, data, calib = setup()
    with registered(DieOnce), main_pid():
        cfg = ScanConfig({"die_once": [{"marker": str(tmp_path / "died")}], "weight_quant": [{"bits": 4}]},
                         batch_size=48)
        single = scan(model, data, cfg, calib=calib, model_spec=SPEC, progress=False)
        spread = scan(model, data, cfg, calib=calib, model_spec=SPEC, progress=False, workers=2,
                      journal=tmp_path / "scan.json.journal")
    assert (tmp_path / "died").exists()
    assert spread.data["provenance"]["workers"]["chunks_retried"] >= 1
    assert rows(spread) == rows(single)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_a_model_without_a_spec_is_pickled_to_the_workers(one_thread):
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(60, 3, 2, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    data = EvalSet(x, y, ["0", "1", "2", "3"], {"spec": "synthetic", "n": 60}, np.arange(60))
    cfg = ScanConfig({"weight_quant": [{"bits": 4}, {"bits": 2}]}, batch_size=20)
    assert rows(scan(model, data, cfg, progress=False, workers=2)) == rows(scan(model, data, cfg, progress=False))


def test_a_model_that_cannot_be_pickled_is_refused_with_the_fix():
    from sensplan import UserInputError

    model, data, _ = setup()
    model.unpicklable = lambda: None  # a lambda attribute: pickle refuses it
    with pytest.raises(UserInputError, match="model spec"):
        scan(model, data, CFG, progress=False, workers=2)
    with pytest.raises(UserInputError, match="--workers"):
        scan(model, data, CFG, progress=False, workers=0)


def test_a_local_ray_cluster_with_two_workers_gives_the_single_process_table(one_thread):
    pytest.importorskip("ray")
    model, data, calib = setup()
    single = scan(model, data, CFG, calib=calib, model_spec=SPEC, progress=False)
    spread = scan(model, data, CFG, calib=calib, model_spec=SPEC, progress=False, workers=2, ray="")
    assert rows(spread) == rows(single)
    assert spread.data["provenance"]["workers"]["backend"] == "ray"


class NotTheSameHere(WeightMethod):
    """Scans one more layer in a worker process than in the main one: workers must refuse."""

    name = "not_the_same_here"
    axis = "weight"
    stage = 30
    default_settings = ({"k": 1},)
    setting_key = "k"

    def check_setting(self, setting):
        return {"k": 1}

    def label(self, setting):
        return "k"

    def effect(self, setting, unit):
        return {"weight_bits": 8}

    def units(self, ctx, settings):
        names = sorted(ctx.layers)
        main = os.environ.get("SENSPLAN_TEST_MAIN") == str(os.getpid())
        return {n: "" for n in (names[:1] if main else names[:2])}

    def transform(self, ctx, layer, w, setting):
        return w


def test_a_worker_that_cannot_start_says_why_and_is_not_retried():
    model, data, calib = setup()
    with registered(NotTheSameHere), main_pid():
        cfg = ScanConfig({"not_the_same_here": [{"k": 1}]}, batch_size=48)
        with pytest.raises(RuntimeError, match="could not start.*other probes than the main process"):
            scan(model, data, cfg, calib=calib, model_spec=SPEC, progress=False, workers=2)
