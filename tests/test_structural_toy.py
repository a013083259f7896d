"""A structure-changing method written entirely in this file, through the public API only.

``half_rows`` replaces a Linear layer of an even output width by a Linear half as wide whose
outputs are used twice: the first and second halves of the original outputs share one row each,
the mean of the two original rows. The layer then stores half its weight rows and does half its
MACs. Nothing in sensplan knows this method: its effect describes what the layer stores as
expressions of the layer's dims, and its ``rebuild_`` replays the change when the file is loaded.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from sensplan import Stored, Structure
from sensplan.planner import Budget, Costs, apply_plan, load_compressed, make_plan
from sensplan.sensitivity import Method, ModelSpec, ScanConfig, WeightMethod, get_method, scan
from tests.conftest import registered, seeded_model, self_labelled

NAME = "half_rows"
SPEC = ModelSpec("sensplan:tiny_convnet", {"num_classes": 6})


class HalfRows(nn.Module):
    """``Linear(in, out // 2)`` whose outputs appear twice, plus the original layer's bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.inner = nn.Linear(in_features, out_features // 2, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        y = torch.cat([y, y], dim=-1)
        return y + self.bias if self.bias is not None else y


def half_rows_of(layer: nn.Linear) -> HalfRows:
    half = layer.out_features // 2
    new = HalfRows(layer.in_features, layer.out_features, layer.bias is not None)
    with torch.no_grad():
        new.inner.weight.copy_((layer.weight[:half] + layer.weight[half:]) / 2)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, new)
    return old


class HalfRowsMethod(Method):
    name = NAME
    axis = "rows"
    stage = 12
    structural = True
    default_settings = ({"share": "halves"},)
    setting_key = "share"
    description = "a Linear layer's two output halves share their rows"

    def check_setting(self, setting):
        if setting.get("share", "halves") != "halves":
            raise ValueError(f"The 'share' setting of {NAME} must be 'halves'. Got {setting.get('share')!r}.")
        return {"share": "halves"}

    def label(self, setting):
        return "half rows"

    def effect(self, setting, unit):
        out, inp = unit.dims[0], unit.dims[1]
        return {"structure": Structure((Stored(out * 0.5, inp),), macs=unit.macs_per_weight * out * 0.5 * inp)}

    def units(self, ctx, settings):
        return {n: "" if isinstance(ctx.module(n), nn.Linear) and ctx.module(n).out_features % 2 == 0
                else "not a Linear layer of an even width" for n in ctx.layers}

    @contextmanager
    def probe(self, ctx, unit, setting):
        original = swap(ctx.model, unit, half_rows_of(ctx.module(unit)))
        try:
            yield
        finally:
            swap(ctx.model, unit, original)

    def apply_(self, ctx, assignment):
        for layer in assignment:
            swap(ctx.model, layer, half_rows_of(ctx.module(layer)))
            ctx.records.setdefault(self.name, []).append(layer)

    def rebuild_(self, ctx, record):
        for layer in record:
            old = ctx.module(layer)
            swap(ctx.model, layer, HalfRows(old.in_features, old.out_features, old.bias is not None))

    def can_be_followed_by(self, other):
        return isinstance(other, WeightMethod) and other.axis == "weight"


@pytest.fixture
def toy():
    with registered(HalfRowsMethod):
        yield get_method(NAME)


def test_a_structural_toy_method_round_trips_with_exact_costs(tmp_path, toy):
    model = seeded_model("tiny_convnet", num_classes=6)
    data = self_labelled(model, 64)
    calib = self_labelled(model, 32, seed=9)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    table = scan(model, data, ScanConfig({NAME: [{"share": "halves"}], "weight_quant": [{"bits": 4}]}),
                 calib=calib, model_spec=SPEC, progress=False)
    linear = sorted(n for n, v in table.layers.items() if v["type"] == "Linear")
    assert linear and {r["unit"] for r in table.results if r["method"] == NAME} == set(linear)
    assert table.methods[NAME]["skipped"]  # the convolutions are not Linear layers
    head = linear[-1]
    # one layer alone: half its weight rows, at 32 bits per value
    out_f, in_f = table.layers[head]["weight_shape"]
    costs = Costs(table)
    choice = costs.choice_of({f"rows:{head}": f'{NAME}:{{"share":"halves"}}'})
    assert costs.original["size"] - costs.evaluate(choice)["size"] == 4 * (out_f // 2) * in_f

    # the smallest reachable size: every Linear shared, every layer at int4 (the toy lets weight
    # formats follow it); the plan must take exactly that, and it is measured as planned
    smallest = costs.choice_of({**{f"rows:{n}": f'{NAME}:{{"share":"halves"}}' for n in linear},
                                **{f"weight:{n}": 'weight_quant:{"bits":4}' for n in table.layers}})
    plan = make_plan(table, [Budget.parse(f"size={costs.evaluate(smallest)['size'] + 1}")])
    chosen = {(c["unit"], c["method"]) for c in plan.variant()["choices"].values() if c["method"]}
    assert chosen == {(n, NAME) for n in linear} | {(n, "weight_quant") for n in table.layers}
    metrics = apply_plan(model, plan, data, tmp_path / "out", calib=calib, model_spec=SPEC, timing=False)
    for m in ("macs", "params", "bops"):
        assert metrics["comparison"][m]["measured"] == metrics["comparison"][m]["predicted"], m
    size = metrics["comparison"]["size"]
    assert 0 <= size["measured"] - size["predicted"] < 16  # whole bytes per stored part
    assert metrics["after"]["reload_max_abs_diff"] == 0.0
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, original[k]), k

    reloaded = load_compressed(tmp_path / "out" / "model.sensplan")
    for n in linear:
        assert isinstance(reloaded.get_submodule(n), HalfRows), n
    assert reloaded.get_submodule(head).inner.weight.shape == (out_f // 2, in_f)
    from sensplan.planner import compress

    cm, _ = compress(model, plan, "planned", data.example_input, calib=calib)
    with torch.inference_mode():
        assert torch.equal(reloaded(data.x), cm.module(data.x))
