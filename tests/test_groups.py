"""The Torch-Pruning adapter: the zeroing probe equals real pruning, is reversible, is checked."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from sensplan.sensitivity import (
    ModelSpec,
    PruningGraph,
    build_model,
    check_group,
    count_macs,
    n_remove_for,
)
from sensplan.sensitivity._models import weights_digest
from tests.conftest import CIFAR_RESNET, seeded_model


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


def _head(channels: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 4)]


def depthwise_net() -> nn.Module:
    """conv -> BN -> depthwise conv -> BN -> pointwise conv: one group couples the first conv's
    outputs with the depthwise conv's channels (its weight's dim 0, for input and output)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), _bn(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1), _bn(8), nn.ReLU(), *_head(8)).eval()


def transpose_net() -> nn.Module:
    """conv -> BN -> ConvTranspose (its weight is (in, out, ...): inputs on dim 0, outputs on 1)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU(),
                         nn.ConvTranspose2d(8, 6, 2, stride=2), _bn(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), *_head(6)).eval()


def norm_net(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), *_head(8)).eval()


def probe_and_real(model: nn.Module, graph: PruningGraph, gid: str, k: int, x: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    idxs = graph.select(gid, k)
    with graph.zeroed(gid, idxs), torch.no_grad():
        probe = model(x)
    pruned = copy.deepcopy(model)
    PruningGraph(pruned, x[:1]).prune_(gid, idxs)
    with torch.no_grad():
        real = pruned(x)
    return probe, real, pruned


def _inputs(n: int = 6, px: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_convnet"])
def test_zeroing_probe_equals_structural_pruning_for_every_group(name):
    model = seeded_model(name)
    x = _inputs()
    graph = PruningGraph(model, x[:1])
    checked = 0
    for gid in graph.group_ids():
        k = n_remove_for(0.5, graph.channels(gid))
        chk = check_group(model, graph, gid, k, x)
        if not chk.ok:
            assert "output shape" in chk.reason, (gid, chk.reason)  # only the classifier
            continue
        checked += 1
        probe, real, pruned = probe_and_real(model, graph, gid, k, x)
        assert torch.allclose(probe, real, atol=1e-5), gid
        # the tensors really shrink, as check_group recorded
        before, after = model.state_dict(), pruned.state_dict()
        for key, dims in chk.shrinks.items():
            for d, per in dims.items():
                assert before[key].shape[int(d)] - after[key].shape[int(d)] == per * k, key
        assert sum(p.numel() for p in pruned.parameters()) < \
            sum(p.numel() for p in model.parameters())
    assert checked >= 2


def test_depthwise_conv_channels_are_zeroed_and_pruned_with_their_producer():
    model = depthwise_net()
    x = _inputs()
    graph = PruningGraph(model, x[:1])
    gid = next(g for g in graph.group_ids() if "3" in {m.module for m in graph.members(g)})
    members = {(m.module, m.kind) for m in graph.members(gid)}
    assert {("0", "Conv2d"), ("3", "Conv2d"), ("6", "Conv2d")} <= members
    chk = check_group(model, graph, gid, 4, x)
    assert chk.ok, chk.reason
    # the depthwise weight (8, 1, 3, 3) and its bias lose rows; the pointwise conv loses inputs
    assert chk.shrinks["3.weight"] == {"0": 1.0} and chk.shrinks["3.bias"] == {"0": 1.0}
    assert chk.shrinks["0.weight"] == {"0": 1.0} and chk.shrinks["6.weight"] == {"1": 1.0}
    idxs = graph.select(gid, 4)
    with graph.zeroed(gid, idxs):
        w = model[3].weight
        assert torch.all(w[idxs] == 0) and torch.all(model[3].bias[idxs] == 0)
        assert torch.all(w[[i for i in range(8) if i not in idxs]] != 0)
    probe, real, pruned = probe_and_real(model, graph, gid, 4, x)
    assert pruned[3].groups == pruned[3].in_channels == pruned[3].out_channels == 4
    assert torch.allclose(probe, real, atol=1e-5)


def test_conv_transpose_channels_are_zeroed_on_the_right_dims():
    model = transpose_net()
    x = _inputs()
    graph = PruningGraph(model, x[:1])
    # the producer's group reaches the ConvTranspose's inputs (weight dim 0) ...
    chk_in = check_group(model, graph, "0", 4, x)
    assert chk_in.ok, chk_in.reason
    assert chk_in.shrinks["3.weight"] == {"0": 1.0} and "3.bias" not in chk_in.shrinks
    # ... and its own group is its outputs (weight dim 1, bias, BatchNorm, the next conv's inputs)
    chk_out = check_group(model, graph, "3", 3, x)
    assert chk_out.ok, chk_out.reason
    assert chk_out.shrinks["3.weight"] == {"1": 1.0} and chk_out.shrinks["3.bias"] == {"0": 1.0}
    assert chk_out.shrinks["6.weight"] == {"1": 1.0}
    for gid, k, dim in (("0", 4, 0), ("3", 3, 1)):
        idxs = graph.select(gid, k)
        with graph.zeroed(gid, idxs):
            assert torch.all(model[3].weight.index_select(dim, torch.tensor(idxs)) == 0)
        probe, real, pruned = probe_and_real(model, graph, gid, k, x)
        assert torch.allclose(probe, real, atol=1e-5), gid
    assert tuple(pruned[3].weight.shape) == (8, 3, 2, 2)


def test_instance_norm_channels_are_zeroed_and_pruned():
    model = norm_net(nn.InstanceNorm2d(8, affine=True))
    x = _inputs()
    graph = PruningGraph(model, x[:1])
    chk = check_group(model, graph, "0", 4, x)
    assert chk.ok, chk.reason
    assert chk.shrinks["1.weight"] == {"0": 1.0} and chk.shrinks["1.bias"] == {"0": 1.0}
    probe, real, _ = probe_and_real(model, graph, "0", 4, x)
    assert torch.allclose(probe, real, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_norm_groups_are_emulated_and_equal_real_pruning(groups):
    """A zeroed channel still counts in its GroupNorm group's statistics, so while it is zeroed the
    probe recomputes the norm over the kept channels; the same positions go from every norm group
    (Torch-Pruning keeps ``num_groups``). Then the probe equals real pruning, and the hook is gone
    afterwards."""
    model = norm_net(nn.GroupNorm(groups, 8))
    x = _inputs()
    graph = PruningGraph(model, x[:1])
    before = weights_digest(model)
    assert graph.channel_step("0") == groups
    k = graph.n_remove_for("0", 0.5)
    assert k == 4
    idxs = graph.select("0", k)
    chunk = 8 // groups
    assert len({i % chunk for i in idxs}) == k // groups  # the same positions in every chunk
    with graph.zeroed("0", idxs), torch.no_grad():
        norm_out = model[1](model[0](x))
        assert torch.all(norm_out[:, idxs] == 0)
    assert not model[1]._forward_hooks
    chk = check_group(model, graph, "0", k, x)
    assert chk.ok, chk.reason
    probe, real, _ = probe_and_real(model, graph, "0", k, x)
    assert torch.allclose(probe, real, atol=1e-5)
    assert weights_digest(model) == before
    if groups > 1:
        with pytest.raises(ValueError, match=f"multiples of {groups}"):
            graph.select("0", k + 1)


def test_group_norm_with_one_channel_per_group_cannot_lose_a_channel():
    model = norm_net(nn.GroupNorm(8, 8))
    graph = PruningGraph(model, _inputs()[:1])
    assert graph.channel_step("0") == 8
    assert graph.n_remove_for("0", 0.8) == 0
    assert "GroupNorm '1' (8 groups)" in graph.step_cause("0")


def grouped_net(groups: int = 4) -> nn.Module:
    """A RegNet-style block: 1x1 conv -> BN -> grouped 3x3 conv -> BN -> 1x1 conv."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 1), _bn(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=groups), _bn(16), nn.ReLU(),
                         nn.Conv2d(16, 8, 1), _bn(8), nn.ReLU(), *_head(8)).eval()


@pytest.mark.parametrize("gid", ["0", "3"])
def test_grouped_conv_groups_lose_the_same_positions_per_chunk_and_equal_real_pruning(gid):
    """Both the group feeding a grouped conv (its inputs) and the group it writes (its outputs)
    remove the same positions from each of its chunks, as Torch-Pruning's pruner does, so the conv
    keeps equal chunks, its input weights are zeroed chunk by chunk, and the probe equals pruning."""
    model = grouped_net(4)
    x = _inputs()
    graph = PruningGraph(model, x[:1])
    assert graph.channel_step(gid) == 4 and "grouped convolution '3' (groups=4)" in graph.step_cause(gid)
    assert [graph.n_remove_for(gid, r) for r in (0.1, 0.3, 0.5, 0.8)] == [0, 4, 8, 12]
    idxs = graph.select(gid, 8)
    assert len(idxs) == 8 and len({i % 4 for i in idxs}) == 2
    chk = check_group(model, graph, gid, 8, x)
    assert chk.ok, chk.reason
    probe, real, pruned = probe_and_real(model, graph, gid, 8, x)
    assert torch.allclose(probe, real, atol=1e-5)
    assert pruned[3].groups == 4 and (pruned[3].in_channels, pruned[3].out_channels) == (
        (8, 16) if gid == "0" else (16, 8))
    if gid == "0":  # the grouped conv's input weights (16, 4, 3, 3): position i % 4 of chunk i // 4
        with graph.zeroed(gid, idxs):
            w = model[3].weight
            for i in idxs:
                assert torch.all(w[(i // 4) * 4:(i // 4 + 1) * 4, i % 4] == 0)
            assert int((w == 0).sum()) == len(idxs) * 4 * 9


def test_layer_norm_over_token_channels_is_emulated():
    """A LayerNorm over the channels of tokens (ViT style): the probe normalises over the kept
    channels only, as the pruned LayerNorm does."""
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.norm(self.fc1(x)))).mean(1)

    model = Tokens().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(5, 7, 6)
    graph = PruningGraph(model, x[:1])
    before = weights_digest(model)
    chk = check_group(model, graph, "fc1", 4, x)
    assert chk.ok, chk.reason
    assert chk.shrinks["norm.weight"] == {"0": 1.0}
    probe, real, _ = probe_and_real(model, graph, "fc1", 4, x)
    assert torch.allclose(probe, real, atol=1e-5)
    assert weights_digest(model) == before and not model.norm._forward_hooks


def test_safety_check_prunes_in_place_and_puts_every_member_back(tiny_resnet):
    """check_group prunes the model itself (no copy, no new trace) and restores the very same
    parameter objects, attributes and graph bookkeeping."""
    x = torch.randn(4, 3, 8, 8)
    graph = PruningGraph(tiny_resnet, x[:1])
    params = {n: p for n, p in tiny_resnet.named_parameters()}
    before = weights_digest(tiny_resnet)
    with graph.pruned("stem.0", graph.select("stem.0", 4)):
        assert tiny_resnet.stem[0].out_channels == 4 and tiny_resnet.block.conv1.in_channels == 4
    assert tiny_resnet.stem[0].out_channels == 8 and tiny_resnet.block.conv1.in_channels == 8
    assert all(p is params[n] for n, p in tiny_resnet.named_parameters())
    assert weights_digest(tiny_resnet) == before and graph.dg._pruning_history == []
    for gid in graph.group_ids():
        check_group(tiny_resnet, graph, gid, 2, x)
    assert weights_digest(tiny_resnet) == before
    with pytest.raises(ValueError, match="graph.model"):
        check_group(copy.deepcopy(tiny_resnet), graph, "stem.0", 2, x)


def test_runaway_index_mapping_skips_the_group_not_the_model():
    """Swin-style reshapes make Torch-Pruning's flatten index mapping multiply the indices at every
    block; the guard turns that into a skip reason for the group instead of gigabytes of indices."""
    from sensplan.sensitivity import _groups

    model = norm_net(nn.BatchNorm2d(8))
    x = _inputs()
    graph = PruningGraph(model, x[:1])
    mapping = tp.dependency.index_mapping._FlattenIndexMapping(stride=100)
    with _groups._IndexGuard(150), pytest.raises(_groups._IndexExplosion, match="past 150 indices"):
        mapping([tp._helpers._HybridIndex(i, i) for i in range(2)])
    assert len(mapping([tp._helpers._HybridIndex(i, i) for i in range(2)])) == 200  # unpatched again
    assert graph.unsafe_reason("0") == ""


def test_zeroed_restores_bit_identically_even_on_error(tiny_resnet):
    graph = PruningGraph(tiny_resnet, torch.randn(1, 3, 8, 8))
    before = weights_digest(tiny_resnet)
    gid = graph.group_ids()[0]
    with pytest.raises(RuntimeError, match="boom"), graph.zeroed(gid, [0, 1]):
        assert weights_digest(tiny_resnet) != before
        raise RuntimeError("boom")
    assert weights_digest(tiny_resnet) == before


def test_residual_stream_is_one_group(tiny_resnet):
    graph = PruningGraph(tiny_resnet, torch.randn(1, 3, 8, 8))
    stream = graph.members("stem.0")
    outs = {m.module for m in stream if m.side == "out"}
    # the stem and the block's second conv write into the same residual stream
    assert {"stem.0", "stem.1", "block.conv2", "block.bn2"} <= outs
    assert {m.module for m in stream if m.side == "in"} >= {"block.conv1", "down.0"}
    assert set(graph.group_ids()) == {"stem.0", "block.conv1", "down.0", "head"}
    assert graph.channels("stem.0") == 8 and graph.channels("down.0") == 16


def test_classifier_group_is_refused(tiny_resnet):
    x = torch.randn(4, 3, 8, 8)
    graph = PruningGraph(tiny_resnet, x[:1])
    chk = check_group(tiny_resnet, graph, "head", 2, x)
    assert not chk.ok and "output shape (4, 4) -> (4, 2)" in chk.reason


def test_zero_padding_shortcut_group_is_found_unsafe_and_model_untouched():
    torch.manual_seed(0)
    model = build_model(ModelSpec(f"{CIFAR_RESNET}:resnet20")).eval()
    x = torch.randn(4, 3, 32, 32)
    graph = PruningGraph(model, x[:1])
    before = weights_digest(model)
    stream = check_group(model, graph, "conv1", 8, x)
    assert not stream.ok
    assert "breaks the model" in stream.reason and "zero-padding" in stream.reason
    inner = check_group(model, graph, "layer2.1.conv1", 16, x)
    assert inner.ok
    assert inner.shrinks["layer2.1.conv1.weight"] == {"0": 1.0}
    assert inner.shrinks["layer2.1.conv2.weight"] == {"1": 1.0}
    assert weights_digest(model) == before


def test_select_is_the_lowest_group_magnitude(tiny_convnet):
    graph = PruningGraph(tiny_convnet, torch.randn(1, 3, 8, 8))
    gid = graph.group_ids()[0]
    imp = graph.importance(gid)
    chosen = graph.select(gid, 3)
    assert len(chosen) == 3 and chosen == sorted(chosen)
    assert max(imp[chosen]) <= min(imp[[i for i in range(len(imp)) if i not in chosen]])
    # a larger ratio removes a superset: the scan's probes are nested like the executor's choices
    assert set(chosen) <= set(graph.select(gid, 5))
    assert graph.select(gid, 0) == []


def test_count_macs_matches_hand_count():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 5))
    assert count_macs(conv, torch.randn(1, 3, 6, 6)) == {"0": 36 * 4 * 3 * 9, "2": 4 * 36 * 5}
    # per sample, whatever the batch; a transposed conv counts its input positions
    convt = nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2))
    assert count_macs(convt, torch.randn(5, 3, 6, 6)) == {"0": 36 * 3 * 4 * 4}


def test_n_remove_for_keeps_one_channel():
    assert n_remove_for(0.5, 16) == 8
    assert n_remove_for(0.1, 4) == 0
    assert n_remove_for(0.3, 5) == 2  # 1.5 rounds half up
    assert n_remove_for(0.99, 3) == 2
    with pytest.raises(ValueError, match=r"range \[0.0, 1.0\)\. Got 1.0"):
        n_remove_for(1.0, 4)


def test_a_group_holding_too_many_indices_in_all_is_skipped(tiny_resnet, monkeypatch):
    """MaxViT's groups pass windows and grids folded into the channel dim at every block: each
    mapping stays under the limit, but the group's indices added up to gigabytes. The guard bounds
    the indices one group holds in all and skips that group with the reason."""
    from sensplan.sensitivity import _groups

    x = torch.randn(1, 3, 8, 8)
    whole = PruningGraph(tiny_resnet, x)
    held = {g: whole._group(g, list(range(whole.channels(g))))._sensplan_indices for g in whole.group_ids()}
    assert all(whole.unsafe_reason(g) == "" for g in whole.group_ids())
    # a budget just below the largest group's total skips that group alone
    top = max(held, key=held.get)
    budget = max(v for g, v in held.items() if g != top)
    assert budget < held[top]
    monkeypatch.setattr(_groups._IndexGuard, "TOTAL_FACTOR", budget / whole._index_limit)
    graph = PruningGraph(tiny_resnet, x)
    assert "collects more than" in graph.unsafe_reason(top)
    assert all(graph.unsafe_reason(g) == "" for g in graph.group_ids() if g != top)


class FunctionalAttention(nn.Module):
    """Like torchvision's Swin attention: the parent passes its Linear children's weights to
    F.linear itself, so the children's forward (and hooks) never run."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 5 tokens, 8)
        q, k, v = nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(1, 2), -1) @ v
        return self.head(nn.functional.linear(a, self.proj.weight, self.proj.bias).mean(1))


def test_layers_used_through_their_weight_are_counted_and_scanned():
    from sensplan.sensitivity import EvalSet, ScanConfig, scan

    torch.manual_seed(0)  # the weights: whether 2-bit qkv flips a prediction depends on them
    model = FunctionalAttention()
    x = torch.randn(2, 5, 8)
    # tokens x weight elements per sample; the head runs as a module: 1 x 24
    assert count_macs(model, x) == {"qkv": 5 * 8 * 24, "proj": 5 * 8 * 8, "head": 8 * 3}
    g = torch.Generator().manual_seed(0)
    data = EvalSet(torch.randn(40, 5, 8, generator=g), torch.arange(40) % 3, ["a", "b", "c"], {"spec": "tokens"})
    table = scan(model, data, ScanConfig({"weight_quant": [{"bits": 2}]}), progress=False)
    probes = {r["unit"]: r for r in table.results}
    assert set(table.layers) == {"qkv", "proj", "head"}
    # quantizing the weight changes what the parent computes with it: the probe measured it
    assert probes["qkv"]["lost"] + probes["qkv"]["gained"] > 0


class SharedWeight(nn.Module):
    """Two Linear layers sharing one weight (tied projections); only ``used`` runs as a module,
    and the parent also calls F.linear with the shared weight (keyword form)."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 8)
        self.tied.weight = self.used.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.used(x), weight=self.used.weight)


def test_shared_weights_are_not_attributed_to_a_layer_that_never_ran():
    model = SharedWeight()
    # only the module call counts: the functional call's weight has two owners (ambiguous), and
    # the tied layer never ran, so it has no MACs (not the used layer's, counted twice)
    assert count_macs(model, torch.randn(3, 8)) == {"used": 64}
    before = model.used.weight.clone()
    count_macs(model, torch.randn(3, 8))
    assert torch.equal(model.used.weight, before)


def test_a_concat_whose_channels_torch_pruning_cannot_infer_does_not_break_the_graph():
    """Torch-Pruning's recursive shape inference stops at a depth limit; past 8 Swin blocks the
    patch-merging concat's input channels come back None and its ``update_concat_index_mapping``
    raises TypeError (swin_s / swin_b lost pruning entirely). The guard leaves that concat unmapped,
    as Torch-Pruning does for other unknown sizes, and marks the groups through it unsafe."""
    import torch_pruning as tp
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1, 8, 1], num_heads=[1, 1, 1, 1],
                            window_size=[2, 2], num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError):  # Torch-Pruning alone
        tp.DependencyGraph().build_dependency(model, example_inputs=x)
    graph = PruningGraph(model, x)
    mapped = [g for g in graph.group_ids() if not graph.unsafe_reason(g)]
    assert len(mapped) >= 8
    assert sum(g.endswith("mlp.0") for g in mapped) == 11  # every block's MLP hidden channels
    # groups through the unmapped concat are unsafe, with that reason (not pruned through it)
    through = [g for g in graph.group_ids() if "concatenation" in graph.unsafe_reason(g)]
    assert through and all("cannot infer" in graph.unsafe_reason(g) for g in through)
    # blocks after the unmapped patch-merging concats prune exactly as the probe predicts
    for gid in ("features.5.0.mlp.0", "features.5.7.mlp.0", "features.7.0.mlp.0"):
        assert check_group(model, graph, gid, 1, x).ok
    # the patched function is Torch-Pruning's own again outside our calls
    assert tp.dependency.index_mapping.update_concat_index_mapping.__name__ == "update_concat_index_mapping"


class PerSampleConv(nn.Module):
    """A parent that runs its conv's weight one sample at a time (unbatched F.conv2d), with the
    conv also registered under a second name."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.alias = self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([nn.functional.conv2d(s, self.conv.weight, self.conv.bias, padding=1) for s in x])


def test_unbatched_functional_convs_cost_their_per_sample_share():
    # 36 positions x 4 x 3 x 9 weights per sample, whatever the loop; the alias is the same layer
    assert count_macs(PerSampleConv(), torch.randn(3, 3, 6, 6)) == {"conv": 36 * 4 * 3 * 9}


class _TiedLM(nn.Module):
    """A residual stream between an embedding and an LM head that is the embedding (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.head(h + self.fc(h))


def test_pruning_the_stream_of_a_tied_lm_head_keeps_one_weight():
    """Torch-Pruning gives the embedding and the head each their own smaller tensor; the executor
    ties them again (else the weight is stored and counted twice: more parameters than before)."""
    from sensplan.sensitivity import channel_graph

    torch.manual_seed(0)
    model = _TiedLM().eval()
    x = torch.randint(0, 20, (2, 5))
    graph = channel_graph(model, x)
    gid = next(g for g in graph.group_ids() if any(m.module == "emb" for m in graph.members(g)))
    before = sum(p.numel() for p in model.parameters())
    graph.prune_(gid, [1, 4])
    assert model.head.weight is model.emb.weight and model.emb.weight.shape == (20, 6)
    assert sum(p.numel() for p in model.parameters()) == before - 2 * 20 - 2 * 8 - 2 - 2 * 6
    assert torch.isfinite(model(x)).all()
