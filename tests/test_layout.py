"""Input memory order: the scan and the verifier feed a convolutional model channels-last inputs
when a timed trial says it runs faster on them; a model that cannot take them, or whose outputs
change, keeps contiguous inputs, and the rows agree with a contiguous scan up to float rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sensplan.sensitivity._scan as scan_module
from sensplan import sensitivity
from sensplan.planner import Verifier
from sensplan.sensitivity import ScanConfig, _eval, scan
from sensplan.sensitivity._eval import _channels_last_faster, channels_last_wins
from tests.conftest import seeded_model, self_labelled


class Flattens(nn.Module):
    """A CNN whose forward ``.view()``s a 4-D activation: it fails on channels-last inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(self.flat(y))

    def flat(self, y: torch.Tensor) -> torch.Tensor:
        return y.view(y.shape[0], -1)


class Strided(Flattens):
    """A CNN whose output depends on the memory order (it reads the raw storage): a wrong answer,
    not an error, on channels-last inputs."""

    def flat(self, y: torch.Tensor) -> torch.Tensor:
        return torch.as_strided(y, (y.shape[0], y.numel() // y.shape[0]), (y.numel() // y.shape[0], 1))


def test_a_model_that_views_activations_keeps_contiguous_inputs():
    x = torch.randn(16, 3, 8, 8)
    model = Flattens().eval()
    with pytest.raises(RuntimeError):
        model(x.contiguous(memory_format=torch.channels_last))
    assert _channels_last_faster(model, x, torch.device("cpu"), 500, None, 1.0, 16) is False


def test_a_model_whose_outputs_change_keeps_contiguous_inputs():
    x = torch.randn(16, 3, 8, 8)
    model = Strided().eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x.contiguous(memory_format=torch.channels_last)))
    # margin 0: channels-last would win on any timing; the outputs alone say no
    assert _channels_last_faster(model, x, torch.device("cpu"), 500, None, 0.0, 16) is False


def test_only_image_inputs_of_a_convolutional_model_qualify():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).eval()
    assert channels_last_wins(mlp, torch.randn(8, 3, 4, 4)) is False  # no convolution
    tokens = torch.randint(0, 10, (8, 12))
    assert channels_last_wins(seeded_model("tiny_resnet"), tokens) is False  # not 4-D floats


def test_the_answer_is_kept_per_architecture(monkeypatch):
    calls = []

    def timed(*args, **kwargs):
        calls.append(1)
        return True

    monkeypatch.setattr(_eval, "_LAYOUT", {})
    monkeypatch.setattr(_eval, "_channels_last_faster", timed)
    x = torch.randn(8, 3, 8, 8)
    a, b = seeded_model("tiny_resnet", 0), seeded_model("tiny_resnet", 1)
    assert channels_last_wins(a, x) and channels_last_wins(b, x)
    assert len(calls) == 1  # the same architecture on the same inputs: timed once
    channels_last_wins(seeded_model("tiny_convnet"), x)
    assert len(calls) == 2


def test_in_layout_changes_only_the_memory_order():
    data = self_labelled(seeded_model("tiny_resnet"), n=8)
    last = data.in_layout(True)
    assert last.x.is_contiguous(memory_format=torch.channels_last) and not last.x.is_contiguous()
    assert torch.equal(last.x, data.x) and last.y is data.y and last.description == data.description
    assert last.in_layout(True) is last and data.in_layout(False) is data
    assert last.in_layout(False).x.is_contiguous()
    assert last.example_input.is_contiguous()  # what tracing and export see


@pytest.mark.parametrize("workers", [1, 2])
def test_a_channels_last_scan_matches_a_contiguous_one(monkeypatch, workers):
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, n=64)
    calib = self_labelled(model, n=32, seed=1)
    cfg = ScanConfig.of(bits=(8, 4), ratios=(0.5,), batch_size=32)
    tables = {}
    for choice in (False, True):
        monkeypatch.setattr(scan_module, "channels_last_wins", lambda *a, choice=choice, **k: choice)
        tables[choice] = scan(model, data, cfg, calib=calib, progress=False, workers=workers)
    assert tables[True].data["provenance"]["input_layout"] == "channels_last"
    assert tables[False].data["provenance"]["input_layout"] == "contiguous"
    a, b = tables[False].results, tables[True].results
    assert [(r["unit"], r["method"], r["setting"]) for r in a] == [(r["unit"], r["method"], r["setting"]) for r in b]
    for r, s in zip(a, b, strict=True):
        assert s["drop"] == pytest.approx(r["drop"], abs=1.5 / len(data))  # at most a near-tie flips
        assert s["loss_increase"] == pytest.approx(r["loss_increase"], rel=1e-3, abs=1e-5)


def test_workers_measure_in_the_main_process_order(monkeypatch):
    """The workers get the main process's choice (not a guess from the data they are sent): a
    channels-last scan on two workers gives the rows of one process, up to the rounding of
    oneDNN's channels-last convolutions on another thread count (contiguous ones are bit-identical:
    tests/test_workers.py)."""
    from sensplan.sensitivity import _workers

    model = seeded_model("tiny_resnet")
    data = self_labelled(model, n=64)
    calib = self_labelled(model, n=32, seed=1)
    cfg = ScanConfig.of(bits=(8, 4), ratios=(0.5,), batch_size=32)
    monkeypatch.setattr(scan_module, "channels_last_wins", lambda *a, **k: True)
    sent = []
    payload = _workers.payload
    monkeypatch.setattr(_workers, "payload", lambda *a, **k: sent.append(payload(*a, **k)) or sent[-1])
    one = scan(model, data, cfg, calib=calib, progress=False)
    two = scan(model, data, cfg, calib=calib, progress=False, workers=2)
    assert [p.channels_last for p in sent] == [True]
    keys = ("unit", "method", "setting", "drop", "lost", "gained")
    assert [{k: r.get(k) for k in keys} for r in one.results] == [{k: r.get(k) for k in keys} for r in two.results]
    for a, b in zip(one.results, two.results, strict=True):
        assert b["loss_increase"] == pytest.approx(a["loss_increase"], rel=1e-4, abs=1e-5)
        for name, s in a["signals"].items():
            assert b["signals"][name]["value"] == pytest.approx(s["value"], rel=1e-4, abs=1e-5)


def test_the_verifier_measures_in_the_chosen_order(monkeypatch):
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, n=32)
    held = self_labelled(model, n=32, seed=2)
    monkeypatch.setattr(sensitivity, "channels_last_wins", lambda *a, **k: True)
    v = Verifier(model, data, None, held)
    assert v.channels_last
    assert not v.held.x.is_contiguous() and v.held.x.is_contiguous(memory_format=torch.channels_last)
    assert not v.data.x.is_contiguous()
    # an order given (the scan's, or the main verifier's for its pool) is not timed again
    monkeypatch.setattr(sensitivity, "channels_last_wins", lambda *a, **k: pytest.fail("timed again"))
    given = Verifier(model, data, None, held, channels_last=False)
    assert not given.channels_last and given.held.x.is_contiguous()


def test_a_verifier_from_a_scan_measures_in_the_scans_order(monkeypatch, tmp_path):
    from sensplan.cli import main
    from sensplan.planner import verifier_from_scan
    from sensplan.sensitivity import Scan
    from tests.conftest import digits_model

    weights = tmp_path / "w.pt"
    torch.save(digits_model().state_dict(), weights)
    monkeypatch.setattr(scan_module, "channels_last_wins", lambda *a, **k: True)
    assert main(["scan", "--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights", str(weights),
                 "--data", "digits", "--samples", "150", "--calib-samples", "100", "--bits", "8",
                 "--no-prune", "--out", str(tmp_path / "scan.json")]) == 0
    table = Scan.load(tmp_path / "scan.json")
    assert table.data["provenance"]["input_layout"] == "channels_last"
    monkeypatch.setattr(sensitivity, "channels_last_wins", lambda *a, **k: pytest.fail("timed again"))
    v, _ = verifier_from_scan(table, holdout_samples=None)
    assert v.channels_last and v.held.x.is_contiguous(memory_format=torch.channels_last)
