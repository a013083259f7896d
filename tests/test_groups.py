import copy

import pytest
import torch

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


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_convnet"])
def test_zeroing_probe_equals_structural_pruning_for_every_group(name):
    model = seeded_model(name)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graph = PruningGraph(model, x[:1])
    checked = 0
    for gid in graph.group_ids():
        k = n_remove_for(0.5, graph.channels(gid))
        chk = check_group(model, graph, gid, k, x)
        if not chk.ok:
            continue
        checked += 1
        idxs = graph.select(gid, k)
        with graph.zeroed(gid, idxs), torch.no_grad():
            probe = model(x)
        pruned = copy.deepcopy(model)
        PruningGraph(pruned, x[:1]).prune_(gid, idxs)
        with torch.no_grad():
            real = pruned(x)
        assert torch.allclose(probe, real, atol=1e-5), gid
        # the tensors really shrink
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert checked >= 2


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
    assert {"stem.0", "block.conv2"} <= outs
    assert "block.conv1" in graph.group_ids()
    assert "block.conv2" not in graph.group_ids()


def test_classifier_group_is_refused(tiny_resnet):
    x = torch.randn(4, 3, 8, 8)
    graph = PruningGraph(tiny_resnet, x[:1])
    chk = check_group(tiny_resnet, graph, "head", 2, x)
    assert not chk.ok and "output shape" in chk.reason


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
    assert inner.shrinks["layer2.1.conv1.weight"] == [0] and inner.shrinks["layer2.1.conv2.weight"] == [1]
    assert weights_digest(model) == before


def test_select_is_the_lowest_group_magnitude(tiny_convnet):
    graph = PruningGraph(tiny_convnet, torch.randn(1, 3, 8, 8))
    gid = graph.group_ids()[0]
    imp = graph.importance(gid)
    chosen = graph.select(gid, 3)
    assert len(chosen) == 3
    assert max(imp[chosen]) <= min(imp[[i for i in range(len(imp)) if i not in chosen]])
    # a larger ratio removes a superset: the scan's probes are nested like the executor's choices
    assert set(chosen) <= set(graph.select(gid, 5))


def test_count_macs_matches_hand_count():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 5))
    macs = count_macs(conv, torch.randn(1, 3, 6, 6))
    assert macs == {"0": 36 * 4 * 3 * 9, "2": 4 * 36 * 5}


def test_n_remove_for_keeps_one_channel():
    assert n_remove_for(0.5, 16) == 8
    assert n_remove_for(0.1, 4) == 0
    assert n_remove_for(0.99, 3) == 2
    with pytest.raises(ValueError, match="range"):
        n_remove_for(1.0, 4)
