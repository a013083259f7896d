import sys

import pytest
import torch

from sensplan import CheckpointError, ModelSpecError
from sensplan.sensitivity import ModelSpec, build_model, list_models, load_model, read_state_dict
from tests.conftest import CIFAR_RESNET, seeded_model


@pytest.fixture
def state(tmp_path):
    model = seeded_model("tiny_convnet")
    return model, model.state_dict()


@pytest.mark.parametrize("wrap", ["plain", "nested", "module_prefix", "nested_prefix", "model_key"])
def test_checkpoint_layouts_load(tmp_path, state, wrap):
    model, sd = state
    obj = {
        "plain": sd,
        "nested": {"state_dict": sd, "epoch": 3, "best_prec1": 91.7},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "nested_prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "model_key": {"model": sd, "optimizer": {"lr": 0.1}},
    }[wrap]
    torch.save(obj, tmp_path / "w.pt")
    loaded = load_model(ModelSpec("sensplan:tiny_convnet"), tmp_path / "w.pt")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k])
    assert not loaded.training


def test_old_checkpoints_without_batchnorm_counters_load(tmp_path, state):
    model, sd = state
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(sd)  # the model does have counters to leave out
    torch.save(old, tmp_path / "old.th")
    loaded = load_model(ModelSpec("sensplan:tiny_convnet"), tmp_path / "old.th")
    got = loaded.state_dict()
    assert list(got) == list(sd)
    for k, v in old.items():
        assert torch.equal(got[k], v), k
    counters = [k for k in got if k.endswith("num_batches_tracked")]
    assert counters and all(got[k].dtype == torch.long and int(got[k]) == 0 for k in counters)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_checkpoint_missing_other_buffers_is_still_refused(tmp_path, state):
    _, sd = state
    torch.save({k: v for k, v in sd.items() if not k.endswith("running_var")}, tmp_path / "bad.th")
    with pytest.raises(CheckpointError, match=r"missing from the file: 1\.running_var"):
        load_model(ModelSpec("sensplan:tiny_convnet"), tmp_path / "bad.th")


def test_mismatched_checkpoint_is_explained(tmp_path, state):
    _, sd = state
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="shape mismatch.*--model-arg"):
        load_model(ModelSpec("sensplan:tiny_convnet", {"num_classes": 7}), tmp_path / "w.pt")


def test_pickled_model_needs_the_explicit_flag(tmp_path, state):
    model, _ = state
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        read_state_dict(tmp_path / "whole.pt")
    with pytest.raises(ModelSpecError, match="--allow-pickle"):
        build_model(ModelSpec(f"pickle:{tmp_path / 'whole.pt'}"))
    loaded = build_model(ModelSpec(f"pickle:{tmp_path / 'whole.pt'}"), allow_pickle=True)
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_model_from_a_file_factory_and_an_import_path(tmp_path, monkeypatch):
    model = build_model(ModelSpec(f"{CIFAR_RESNET}:resnet20"))
    assert sum(p.numel() for p in model.parameters()) == 269722  # the published ResNet-20 size
    pkg = tmp_path / "mypkg_sensplan_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        "import torch\ndef build(width=4):\n    return torch.nn.Linear(width, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_model(ModelSpec("mypkg_sensplan_test.models:build", {"width": 6}))
    assert m.in_features == 6
    sys.modules.pop("mypkg_sensplan_test.models", None)


def test_a_model_the_file_builds_at_import_is_used_as_a_copy(tmp_path):
    (tmp_path / "built.py").write_text("import torch\nmodel = torch.nn.Linear(3, 2)\n")
    a = build_model(ModelSpec(f"{tmp_path / 'built.py'}:model"))
    b = build_model(ModelSpec(f"{tmp_path / 'built.py'}:model"))
    assert isinstance(a, torch.nn.Linear) and a is not b and torch.equal(a.weight, b.weight)
    with torch.no_grad():
        a.weight.zero_()
    assert not torch.equal(a.weight, b.weight)  # the file's own model is never changed


def test_torchvision_model_by_name():
    m = build_model(ModelSpec("torchvision:resnet18", {"num_classes": 10}))
    assert m.fc.out_features == 10


@pytest.mark.parametrize("spec,fragment", [
    ("torchvision:resnet19", "Did you mean 'resnet18'"),
    ("sensplan:tiny_resnt", "Did you mean 'tiny_resnet'"),
    ("nonexistent/file.py:build", "does not exist"),
    ("no_such_package_xyz.models:build", "Cannot import"),
    ("resnet18", "has no ':'"),
])
def test_bad_model_specs_are_explained(spec, fragment):
    with pytest.raises(ModelSpecError) as e:
        build_model(ModelSpec(spec))
    assert fragment in str(e.value)


def test_missing_factory_suggests_a_close_name():
    with pytest.raises(ModelSpecError, match="Did you mean .*'resnet20'"):
        build_model(ModelSpec(f"{CIFAR_RESNET}:resnet2O"))


def test_registry_lists_the_demo_model():
    assert "digits_cnn" in list_models()
    assert list_models("tiny_*") == ["tiny_convnet", "tiny_resnet"]


def test_random_initialisation_is_seeded_and_leaves_the_global_random_state_alone():
    """Without weights every command builds the same random model (scan, plan and apply agree)."""
    from sensplan.sensitivity._models import weights_digest

    spec = ModelSpec("sensplan:tiny_convnet")
    state = torch.random.get_rng_state()
    a, b = load_model(spec), load_model(spec)
    assert weights_digest(a) == weights_digest(b)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert weights_digest(load_model(spec, init_seed=1)) != weights_digest(a)


def test_cli_warns_loudly_without_weights(capsys):
    import argparse

    from sensplan.cli._common import load_model as cli_load_model

    args = argparse.Namespace(model="sensplan:tiny_convnet", model_arg=[], weights=None, allow_pickle=False)
    cli_load_model(args)
    err = capsys.readouterr().err
    assert "WARNING: no --weights" in err and "RANDOMLY INITIALISED" in err and "seeded" in err
    assert "sensplan demo" not in err
    # the demo's model: the warning says which command trains it
    cli_load_model(argparse.Namespace(model="sensplan:digits_cnn", model_arg=[], weights=None, allow_pickle=False))
    assert "`sensplan demo --out DIR` trains this model" in capsys.readouterr().err
