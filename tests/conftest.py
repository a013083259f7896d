"""Shared fixtures: tiny real models with seeded weights, seeded synthetic data, ../shared paths."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from sensplan.sensitivity import METHODS, EvalSet, ModelSpec, build_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SENSPLAN_SHARED", ROOT.parent / "shared"))
RESNET20_JPEG = SHARED / "models" / "cifar10" / "resnet20_jpeg.pt"
RESNET20_ORIG = SHARED / "models" / "cifar10" / "resnet20.th"
CIFAR_TEST = SHARED / "data" / "cifar10-jpg" / "test"
CIFAR_TRAIN = SHARED / "data" / "cifar10-jpg" / "train"
CIFAR_RESNET = ROOT / "examples" / "cifar_resnet.py"

needs_shared = pytest.mark.skipif(
    not (RESNET20_JPEG.is_file() and CIFAR_TEST.is_dir()),
    reason="../shared (CIFAR-10 JPEG data and ResNet weights) is not present")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def contiguous_inputs() -> Iterator[None]:
    """Every test measures on contiguous inputs unless it asks otherwise: the scan's choice of
    channels-last inputs is timed (see ``_eval.channels_last_wins``), so it could differ between
    machines and runs, and the orders round apart (about 1e-7). ``tests/test_layout.py`` tests the
    choice itself, and the scans and verifiers that follow it. Session-wide: a module's shared
    scan (a module-scoped fixture) is made before any function-scoped fixture applies, and a timed
    choice there made the executor's exact comparisons flaky on a busy machine."""
    from sensplan.sensitivity import _eval

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_eval, "_LAYOUT", {})
        mp.setattr(_eval, "_channels_last_faster", lambda *args, **kwargs: False)
        yield


@contextmanager
def registered(*methods: type) -> Iterator[None]:
    """The method classes ``methods`` registered meanwhile (a test's toy methods), removed after."""
    for m in methods:
        METHODS.register(m)
    try:
        yield
    finally:
        for m in methods:
            METHODS.remove(m.name)


def seeded_model(name: str, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    """A registry model with seeded random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec(f"sensplan:{name}", kwargs))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def fit_digits(model: torch.nn.Module, seed: int = 0, epochs: int = 2) -> torch.nn.Module:
    """``model`` (1-channel 8x8 inputs, 10 outputs) trained briefly on digits:train, in place, in
    eval mode: well above chance (a scan refuses a model at chance level), in about half a second."""
    from sensplan.planner._demo import train_digits_model

    return train_digits_model(seed, epochs, model, cosine=False, weight_decay=0.0)


@functools.cache
def _digits_state(width: int, seed: int) -> dict[str, torch.Tensor]:
    model = fit_digits(seeded_model("digits_cnn", seed, width=width), seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def digits_model(width: int = 8, seed: int = 0) -> torch.nn.Module:
    """``sensplan:digits_cnn`` trained briefly on digits:train (2 epochs: about 0.7 top-1 on digits,
    well above chance; a scan refuses a model at chance level). A new module each call."""
    model = build_model(ModelSpec("sensplan:digits_cnn", {"width": width}))
    model.load_state_dict(_digits_state(width, seed))
    return model.eval()


def self_labelled(model: torch.nn.Module, n: int = 96, shape: tuple[int, ...] = (3, 8, 8),
                  seed: int = 0, spec: str = "synthetic") -> EvalSet:
    """Seeded random inputs labelled by the model's own predictions: baseline top-1 is exactly 1.0,
    so every perturbation that changes a prediction shows up as a drop.

    A random network tends to predict one class for everything; the first call centres the head's
    bias on the data (once per model) so the predictions spread over the classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        if not getattr(model, "_sensplan_test_centred", False):
            # BatchNorm statistics measured on the data, as a trained model's would be
            self_labelled_bn_stats(model, x)
            head.weight *= 3.0 / float(model(x).std(0).mean() + 1e-6)
            head.bias -= model(x).mean(0)
            model._sensplan_test_centred = True
        y = model(x).argmax(1)
    classes = [str(i) for i in range(int(model(x[:1]).shape[1]))]
    return EvalSet(x, y, classes, {"spec": spec, "kind": "synthetic", "n": n, "seed": seed,
                                   "input_shape": list(shape)}, np.arange(n))


def self_labelled_bn_stats(model: torch.nn.Module, x: torch.Tensor) -> None:
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    model(x)
    for m in bns:
        m.momentum = 0.1
    model.eval()


@pytest.fixture
def tiny_resnet() -> torch.nn.Module:
    return seeded_model("tiny_resnet")


@pytest.fixture
def tiny_convnet() -> torch.nn.Module:
    return seeded_model("tiny_convnet")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """``sensplan demo`` run once for the session, as a new user runs it (one fine-tuning epoch and
    no timing, to keep the suite short): its exit code, stdout, stderr and output directory."""
    from sensplan.cli import main

    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        code = main(["demo", "--out", str(out), "--epochs", "1", "--no-timing"])
    return {"code": code, "out": o.getvalue(), "err": e.getvalue(), "dir": out}
