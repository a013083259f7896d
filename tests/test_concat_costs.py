"""Costs of models that concatenate channels, and of attention layers, equal the measured ones.

Real pruning removes channels of a concatenated dimension additively (each branch's group removes
its own), so the cost model sums the removals per dim. Measured before the fix on inception_v3:
290.1M MACs against a 272.7M budget, with 1.22x the predicted parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sensplan.planner import Budget, apply_plan, make_plan
from sensplan.sensitivity import EvalSet, ModelSpec, ScanConfig, build_model, count_macs, scan


def _random_data(model: nn.Module, n: int, px: int) -> EvalSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, px, px, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return EvalSet(x, y, [str(i) for i in range(10)],
                   {"spec": "synthetic", "n": n, "indices_sha256": "0"}, np.arange(n))


@pytest.mark.parametrize("name,px", [
    ("squeezenet1_0", 64),
    pytest.param("googlenet", 64, marks=pytest.mark.slow),
    pytest.param("inception_v3", 75, marks=pytest.mark.slow),
])
def test_concatenating_models_predicted_costs_equal_measured(name: str, px: int, tmp_path) -> None:
    kwargs: dict[str, object] = {"num_classes": 10}
    if name != "squeezenet1_0":
        kwargs.update(aux_logits=False, init_weights=False)
    torch.manual_seed(0)
    spec = ModelSpec(f"torchvision:{name}", kwargs)
    model = build_model(spec)
    data = _random_data(model, 8, px)
    table = scan(model, data, ScanConfig.of(ratios=(0.5,), quantize=False), model_spec=spec,
                 progress=False)
    assert len(table.scanned_groups()) > 10
    plan = make_plan(table, [Budget.parse("macs=0.8")])
    for variant in ("planned", "uniform"):
        m = apply_plan(model, plan, data, tmp_path / variant, variant=variant, timing=False,
                       model_spec=spec)
        for metric in ("macs", "params", "size"):
            c = m["comparison"][metric]
            assert c["measured"] == pytest.approx(c["predicted"], rel=1e-9, abs=8), (variant, metric)
        assert all(b["met"] for b in m["budgets"])


def test_multihead_attention_is_counted_and_quantizable(tmp_path) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 16, 4, stride=4)
            self.encoder = layer
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 4 tokens, 16)
            return self.head(self.encoder(t).mean(1))

    model = Tiny().eval()
    x = torch.randn(1, 3, 8, 8)
    macs = count_macs(model, x)
    tokens, e = 4, 16
    # packed q/k/v projections + the two attention products; the output projection separately
    assert macs["encoder.self_attn"] == 3 * tokens * e * e + 2 * tokens * tokens * e
    assert macs["encoder.self_attn.out_proj"] == tokens * e * e
    data = _random_data(model, 16, 8)
    table = scan(model, data, ScanConfig({"weight_quant": [{"bits": 4}]}), progress=False)
    assert table.layers["encoder.self_attn"]["weight"] == "encoder.self_attn.in_proj_weight"
    assert "encoder.self_attn.out_proj" in table.layers
    plan = make_plan(table, [Budget.parse("size=0.3")])
    quantized = {c["unit"] for c in plan.variant()["choices"].values() if c["method"]}
    assert "encoder.self_attn" in quantized  # the packed q/k/v weight is the biggest tensor
    m = apply_plan(model, plan, data, tmp_path, timing=False)
    assert m["comparison"]["size"]["measured"] == pytest.approx(m["comparison"]["size"]["predicted"], abs=16)
    assert m["comparison"]["macs"]["measured"] == m["comparison"]["macs"]["predicted"]


class _SkipConcat(nn.Module):
    """``y = x + c2(cat([x, z]))``: group c1 shrinks c2's output dim alone and, with group c3, its
    concatenated input dim too (a GNN or transformer block's ``h + mlp(cat(h, m))``)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c3 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(14, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x, z = torch.relu(self.c1(inp)), torch.relu(self.c3(inp))
        return self.fc((x + self.c2(torch.cat([x, z], 1))).mean((2, 3)))


def test_a_group_that_shrinks_a_dim_alone_and_a_shared_dim_counts_once(tmp_path) -> None:
    from sensplan.planner import AnalyticCosts, Costs
    from sensplan.planner._costs import merged_effects

    torch.manual_seed(0)
    model = _SkipConcat().eval()
    data = _random_data(model, 64, 8)
    table = scan(model, data, ScanConfig({"prune": [{"ratio": 0.25}, {"ratio": 0.5}]}, check_samples=4),
                 progress=False)
    shrinks = table.tensors["c2.weight"]["shrinks"]
    both = [g for g, dims in shrinks.items() if {"0", "1"} <= set(dims)]  # the residual stream's group
    assert len(shrinks) == 2 and len(both) == 1
    cm = Costs(table)
    rng = np.random.default_rng(0)
    for _ in range(50):  # the terms equal the direct evaluation at every choice
        choice = {i: int(rng.integers(len(b.options))) for i, b in enumerate(cm.blocks)}
        removed = {b.unit: b.options[choice[i]].effect.get("removed", 0) for i, b in enumerate(cm.blocks)
                   if b.kind == "group"}
        direct = AnalyticCosts(table).direct(removed, merged_effects(cm.blocks, choice))
        assert cm.evaluate(choice) == pytest.approx(direct, rel=1e-12)
    plan = make_plan(table, [Budget.parse("macs=0.6")], time_limit=20)
    m = apply_plan(model, plan, data, tmp_path, timing=False)
    for metric in ("macs", "params", "size"):
        assert m["comparison"][metric]["measured"] == pytest.approx(m["comparison"][metric]["predicted"],
                                                                    rel=1e-12, abs=8), metric
