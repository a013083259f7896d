"""A compression method written outside sensplan, through the public API only.

The toy method truncates float32 weights to bfloat16 (drops the low 16 mantissa bits, rounding
toward zero, unlike the built-in ``half`` method, which rounds to nearest). Its cost effect uses
the shared vocabulary, so the planner prices it and the container stores it with no edit anywhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from sensplan import UserInputError
from sensplan.planner import Budget, Costs, apply_plan, load_compressed, make_plan
from sensplan.sensitivity import (
    METHODS,
    ModelSpec,
    ScanConfig,
    WeightMethod,
    get_method,
    scan,
)
from sensplan.sensitivity.methods import parse_method_list
from tests.conftest import registered, seeded_model, self_labelled

NAME = "bf16_truncate"
SPEC = ModelSpec("sensplan:tiny_resnet")


def truncate_to_bfloat16(w: torch.Tensor) -> torch.Tensor:
    """float32 values with their low 16 bits cleared: exactly representable in bfloat16."""
    bits = w.detach().float().contiguous().view(torch.int32) & -65536  # 0xFFFF0000
    return bits.view(torch.float32).to(w.dtype)


class TruncateBF16(WeightMethod):
    name = NAME
    axis = "weight"
    stage = 30
    default_settings = ({"mode": "truncate"},)
    setting_key = "mode"
    description = "bfloat16 weights by truncation (round toward zero)"

    def check_setting(self, setting):
        if setting.get("mode", "truncate") != "truncate":
            raise ValueError(f"The 'mode' setting of {NAME} must be 'truncate'. Got "
                             f"{setting.get('mode')!r} instead.")
        return {"mode": "truncate"}

    def label(self, setting):
        return "bf16 trunc"

    def effect(self, setting, unit):
        return {"weight_bits": 16, "weight_dtype": "bfloat16"}

    def transform(self, ctx, layer, w, setting):
        return truncate_to_bfloat16(w)


@pytest.fixture
def toy():
    with registered(TruncateBF16):
        yield get_method(NAME)


@pytest.fixture
def setup():
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 64)
    calib = self_labelled(model, 32, seed=9)
    return model, data, calib


def test_a_registered_toy_method_is_scanned_planned_and_applied(tmp_path, toy, setup):
    model, data, calib = setup
    original = {k: v.clone() for k, v in model.state_dict().items()}
    table = scan(model, data, ScanConfig({NAME: [{"mode": "truncate"}]}), calib=calib,
                 model_spec=SPEC, progress=False)
    rows = [r for r in table.results if r["method"] == NAME]
    assert {r["unit"] for r in rows} == set(table.layers)
    assert all(r["effect"] == {"weight_bits": 16, "weight_dtype": "bfloat16"} for r in rows)
    assert table.methods[NAME]["description"] == TruncateBF16.description

    # the smallest reachable size is every layer in bfloat16: a budget at that size needs them all
    costs = Costs(table)
    everything = costs.choice_of({f"weight:{u}": f'{NAME}:{{"mode":"truncate"}}'
                                  for u in table.layers})
    smallest = costs.evaluate(everything)["size"]
    saved = costs.original["size"] - smallest
    weights = sum(4 * torch.Size(v["weight_shape"]).numel() for v in table.layers.values())
    assert saved == weights / 2  # 16 of 32 bits per weight value
    plan = make_plan(table, [Budget.parse(f"size={math.ceil(smallest)}")])
    chosen = {c["unit"]: c["method"] for c in plan.variant()["choices"].values()}
    assert chosen == dict.fromkeys(table.layers, NAME)
    assert plan.variant()["predicted"]["size"] == smallest

    metrics = apply_plan(model, plan, data, tmp_path / "out", calib=calib, model_spec=SPEC,
                         timing=False)
    assert metrics["comparison"]["size"]["measured"] == metrics["comparison"]["size"]["predicted"]
    assert all(b["met"] for b in metrics["budgets"])
    assert metrics["after"]["reload_max_abs_diff"] == 0.0
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, original[k]), k

    reloaded = load_compressed(tmp_path / "out" / "model.sensplan")
    for layer, info in table.layers.items():
        w0 = original[info["weight"]]
        w = reloaded.get_parameter(info["weight"])
        assert torch.equal(w, truncate_to_bfloat16(w0)), layer
        assert not torch.equal(w, w0.to(torch.bfloat16).float()), layer  # truncated, not rounded


def test_the_toy_method_is_removed_again(toy):
    assert NAME in METHODS
    METHODS.remove(NAME)
    assert NAME not in METHODS
    METHODS.register(TruncateBF16)  # the fixture's finalizer removes it again


def test_a_duplicate_method_name_is_refused(toy):
    with pytest.raises(ValueError, match=f"{NAME!r} is already registered"):
        METHODS.register(TruncateBF16)

    class Clash(TruncateBF16):
        name = "weight_quant"

    with pytest.raises(ValueError, match="already registered"):
        METHODS.register(Clash)
    assert type(get_method("weight_quant")).__name__ == "WeightQuant"  # the built-in is kept


def test_unknown_method_names_suggest_the_closest(toy):
    with pytest.raises(UserInputError, match="Did you mean 'bf16_truncate'") as e:
        get_method("bf16_truncat")
    assert "weight_quant" in str(e.value) and "--methods" in str(e.value)
    with pytest.raises(UserInputError, match="Did you mean 'weight_quant'"):
        ScanConfig({"weight_qaunt": [{"bits": 4}]})
    with pytest.raises(UserInputError, match="Did you mean 'sparsity'"):
        parse_method_list("prune,sparsty")


def test_the_toy_settings_are_validated(toy):
    with pytest.raises(UserInputError, match="'mode' setting of bf16_truncate"):
        ScanConfig({NAME: [{"mode": "round"}]})
