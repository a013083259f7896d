import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from sensplan.sensitivity._quant import (
    SUPPORTED_BITS,
    QFormat,
    act_qparams,
    dequantize,
    dequantize_codes,
    fake_quantize,
    fake_quantize_activation,
    install_input_quant,
    pack_codes,
    packed_nbytes,
    qmax,
    quantize,
    quantize_per_channel,
    unpack_codes,
)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_round_trip_is_exact_and_compact(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-qmax(bits), qmax(bits) + 1, (7, 5, 3), generator=g).to(torch.int8)
    data = pack_codes(q, bits)
    assert len(data) == packed_nbytes(q.numel(), bits)
    assert torch.equal(unpack_codes(data, bits, tuple(q.shape)), q)


def test_codes_are_symmetric_and_per_channel():
    w = torch.randn(4, 3, 3, 3)
    w[2] *= 100  # one channel with a much larger range must not coarsen the others
    q, s = quantize_per_channel(w, 4)
    assert q.dtype == torch.int8 and s.shape == (4,)
    assert int(q.abs().max()) <= qmax(4)
    err = (dequantize(q, s) - w).abs().amax(dim=(1, 2, 3))
    assert err[0] < 0.5 and err[2] > 10 * err[0]


def test_error_shrinks_with_more_bits():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    errs = [float(((fake_quantize(w, b) - w) ** 2).mean()) for b in (2, 3, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4


def test_two_bits_is_ternary():
    q, _ = quantize_per_channel(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), 2)
    assert set(q.unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_requantizing_quantized_weights_returns_the_same_codes(bits):
    """The executor relies on this: it extracts codes again after structural pruning."""
    torch.manual_seed(bits)
    w = torch.randn(12, 8, 3, 3)
    q1, s1 = quantize_per_channel(w, bits)
    q2, s2 = quantize_per_channel(dequantize(q1, s1), bits)
    assert torch.equal(q1, q2)
    assert torch.allclose(s1, s2, rtol=1e-6)


def test_unsupported_bits_are_rejected():
    with pytest.raises(ValueError, match="'bits' parameter"):
        quantize_per_channel(torch.randn(2, 2), 1)


def test_activation_range_always_includes_zero():
    qp = act_qparams(0.5, 2.0, 8)  # a post-ReLU range widened down to 0
    assert qp == {"bits": 8, "scale": pytest.approx(2.0 / 255), "zero_point": 0}
    qp = act_qparams(-1.0, 3.0, 4)
    assert qp["scale"] == pytest.approx(4.0 / 15) and qp["zero_point"] == round(1.0 / (4.0 / 15))
    assert act_qparams(0.0, 0.0, 8) == {"bits": 8, "scale": 1.0, "zero_point": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_activation_quantization_in_place_equals_the_formula_and_keeps_gradients_flowing(dtype):
    qp = act_qparams(-1.0, 3.0, 8)
    scale, zp = qp["scale"], qp["zero_point"]
    # ties at half steps, values beyond the range, and random ones
    x = torch.cat([(torch.arange(-300, 900) + 0.5) * scale - zp * scale, torch.randn(5000) * 3]).to(dtype)
    want = ((torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale).to(dtype)
    got = fake_quantize_activation(x, qp)
    assert got.dtype == dtype and torch.equal(got, want) and not torch.equal(x, got)
    leaf = x.float().clone().requires_grad_(True)  # under autograd: the out-of-place form
    fake_quantize_activation(leaf, qp).sum().backward()
    assert leaf.grad is not None


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_activation_quantization_rounds_to_the_grid_and_clamps(bits):
    qp = act_qparams(-1.0, 3.0, bits)
    scale, zp = qp["scale"], qp["zero_point"]
    x = torch.linspace(-1.0, 3.0, 1001)
    y = fake_quantize_activation(x, qp)
    assert (y - x).abs().max() <= scale / 2 + 1e-6
    levels = torch.round(y / scale) + zp
    assert torch.allclose(y, (levels - zp) * scale, atol=1e-6)
    assert int(levels.min()) >= 0 and int(levels.max()) <= 2 ** bits - 1
    assert len(torch.unique(levels)) <= 2 ** bits
    assert float(fake_quantize_activation(torch.tensor([0.0]), qp)) == 0.0  # zero is exact
    outside = fake_quantize_activation(torch.tensor([-50.0, 50.0]), qp)
    assert torch.allclose(outside, torch.tensor([-zp * scale, (2 ** bits - 1 - zp) * scale]))


def test_input_quantization_hook_quantizes_the_input_and_is_removable():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    x = torch.randn(8, 16)
    qp = act_qparams(float(x.min()), float(x.max()), 4)
    with torch.no_grad():
        plain = layer(x)
        handle = install_input_quant(layer, qp)
        hooked = layer(x)
        assert torch.equal(hooked, layer.forward(fake_quantize_activation(x, qp)))
        assert not torch.equal(hooked, plain)
        copied = copy.deepcopy(layer)  # the executor deep-copies models with hooks installed
        assert torch.equal(copied(x), hooked)
        handle.remove()
        assert torch.equal(layer(x), plain)


def _bench_quant():
    """bench/bench_quant.py, whose ``whole_tensor`` is the search as written on the whole tensor at
    once (the definition, and the bench's baseline)."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("sensplan_bench_quant", root / "bench" / "bench_quant.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_whole_tensor_search = _bench_quant().whole_tensor


@pytest.mark.parametrize("block", [1, 7 * 9, 1 << 20])  # 2 rows per block, 7 rows and a partial last block, one block
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_blocked_clipping_search_is_bit_identical_to_the_whole_tensor_search(monkeypatch, block, bits):
    import sensplan.sensitivity._quant as quant

    monkeypatch.setattr(quant, "_BLOCK_CPU", block)
    g = torch.Generator().manual_seed(bits)
    for shape in [(50, 3, 3), (1, 40), (13, 1)]:
        w = torch.randn(*shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g)
        q, s = quantize_per_channel(w, bits)
        q_ref, s_ref = _whole_tensor_search(w, bits)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref), shape


def test_blocked_search_matches_the_whole_tensor_on_two_threads_with_long_rows(monkeypatch):
    """A lone long row would be summed in parallel: the last single row joins the block before."""
    import sensplan.sensitivity._quant as quant

    monkeypatch.setattr(quant, "_BLOCK_CPU", 40000 * 2)  # blocks of 2 rows: 27 rows end in one
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.randn(27, 40000, generator=torch.Generator().manual_seed(0))
        q, s = quantize_per_channel(w, 4)
        q_ref, s_ref = _whole_tensor_search(w, 4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("fmt", [QFormat(4, 32), QFormat(3, 0, True), QFormat(2, 64, True), QFormat(5, 128)])
def test_group_wise_and_zero_point_codes(fmt):
    torch.manual_seed(fmt.bits)
    w = torch.randn(6, 10, 3, 3)  # rows of 90 values: groups of 32 leave a shorter last group
    w[:, :5] += 0.5  # asymmetric values
    q, s, z = quantize(w, fmt)
    groups = -(-90 // fmt.group_size) if fmt.group_size else 1
    assert q.shape == w.shape and s.shape == ((6, groups) if fmt.group_size else (6,))
    if fmt.asymmetric:
        assert z is not None and z.shape == s.shape
        assert int(q.min()) >= 0 and int(q.max()) <= 2 ** fmt.bits - 1
        assert len(q.unique()) == 2 ** fmt.bits  # every level is used (4 at 2 bits, not 3)
    else:
        assert z is None and int(q.abs().max()) <= qmax(fmt.bits)
    wq = dequantize_codes(q, s, z, fmt.group_size)
    assert torch.equal(wq, fake_quantize(w, fmt))
    per_channel = float(((fake_quantize(w, fmt.bits) - w) ** 2).mean())
    err = float(((wq - w) ** 2).mean())
    assert err <= per_channel  # never coarser than one symmetric scale per channel
    if groups > 1 or fmt.asymmetric:
        assert err < per_channel
    q2, s2, z2 = quantize(wq, fmt)  # the executor quantizes quantized weights again
    assert torch.equal(q2, q) and (z is None or torch.equal(z2, z))
    zero = torch.zeros_like(w)
    zero[:, :, 1] = w[:, :, 1]
    assert bool((fake_quantize(zero, fmt)[:, :, 0] == 0).all())  # 0 stays exactly 0


def test_a_format_is_one_of_the_supported_ones():
    with pytest.raises(ValueError, match="group size must be one of"):
        QFormat(4, 100)
    with pytest.raises(ValueError, match="'bits' parameter"):
        QFormat(9)


def test_the_envelope_compares_weight_formats_only_within_their_family():
    """int4g64 is not coarser than int4a (a zero point against smaller groups): the planner must not
    force its drop up to int4a's. Within one family fewer bits is never better."""
    import numpy as np

    from sensplan.planner._costs import Block, Option, _monotone
    from sensplan.sensitivity import get_method

    wq = get_method("weight_quant")
    settings = sorted(wq.parse_settings("8,4a,4g64,3a"), key=wq.level)
    opts = [Option(None, {}, "none", {})] + [
        Option("weight_quant", s, wq.label(s), {}, wq.level(s), family=wq.family(s)) for s in settings]
    raw = {"int8": 0.0, "int4a": 0.3, "int4g64": 0.1, "int3a": 0.2}
    values = np.array([0.0, *(raw[o.label] for o in opts[1:])])
    env = dict(zip([o.label for o in opts], _monotone(Block("l", "weight", "layer", tuple(opts)), values), strict=True))
    assert env["int4g64"] == 0.1  # not raised to int4a's 0.3
    assert env["int3a"] == 0.3  # but 3 bits with a zero point is never better than 4 with one


def test_scan_rows_name_their_format_family_also_when_resumed_from_an_older_journal(tmp_path):
    import json

    from sensplan.sensitivity import ScanConfig, scan
    from tests.conftest import seeded_model, self_labelled

    model = seeded_model("tiny_convnet")
    data = self_labelled(model, n=32)
    cfg = ScanConfig({"weight_quant": [{"bits": 4}, {"bits": "4a"}, {"bits": "3g32"}]})
    journal = tmp_path / "scan.json.journal"
    first = scan(model, data, cfg, progress=False, journal=journal)
    assert {r["label"]: r.get("family", "") for r in first.results} == {"int4": "", "int4a": "a", "int3g32": "g32"}
    lines = journal.read_text().splitlines()
    old = [lines[0]] + [json.dumps({**(o := json.loads(x)), "record": {k: v for k, v in o["record"].items()
                                                                       if k != "family"}}) for x in lines[1:]]
    journal.write_text("\n".join(old) + "\n")  # as a journal written before rows had a family
    again = scan(model, data, cfg, progress=False, journal=journal)
    assert again.data["provenance"]["probes_from_journal"] == len(again.results)
    assert [r.get("family", "") for r in again.results] == [r.get("family", "") for r in first.results]
