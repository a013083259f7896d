"""The prefix cache: a scan that runs each probe from the first layer it changes gives bit for bit
the rows of a scan that runs the whole model, on a ResNet, an MLP, a model with branches and a
transformer block; models it cannot trace, activations spilled to disk, and changes no check sees."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

from sensplan.sensitivity import EvalSet, ScanConfig, scan
from sensplan.sensitivity._eval import batchnorm_statistics, recalibrate_batchnorm_
from sensplan.sensitivity._prefix import PrefixCache
from sensplan.sensitivity.methods import Method
from tests.conftest import registered, seeded_model, self_labelled

COMPARED = ("unit", "method", "setting", "score", "loss", "drop", "drop_se", "lost", "gained",
            "loss_increase", "signals")


def rows(table):
    return [{k: r.get(k) for k in COMPARED} for r in table.results]


def both(model, data, cfg, calib=None, **kw):
    """The scan with the prefix cache off and on: (rows off, rows on, the cached scan's record)."""
    off = scan(model, data, ScanConfig(cfg.settings, batch_size=cfg.batch_size, cache_mb=0),
               calib=calib, progress=False)
    on = scan(model, data, ScanConfig(cfg.settings, batch_size=cfg.batch_size, **kw), calib=calib,
              progress=False)
    return rows(off), rows(on), on.data["provenance"]["prefix_cache"]


def labelled(model, x):
    with torch.no_grad():
        y = model(x).argmax(1)
    n = len(x)
    return EvalSet(x, y, [str(i) for i in range(int(model(x[:1]).shape[1]))],
                   {"spec": "synthetic", "kind": "synthetic", "n": n}, np.arange(n))


def test_a_resnet_scan_is_bit_identical_with_batchnorm_recalibration():
    model = seeded_model("tiny_resnet")
    data, calib = self_labelled(model, 160), self_labelled(model, 48, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ScanConfig.defaults(["prune", "weight_quant", "act_quant", "lowrank"], batch_size=48)
    off, on, record = both(model, data, cfg, calib)
    assert on == off
    assert record["used"] and record["probes run from a cut"] == len(on)
    assert record.get("probes run in full", 0) == 0
    # each batch of the sample and of the calibration set is cached once per cut, then reused
    assert record["batches from the cache"] > 3 * record["batches cached"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(inplace=True), nn.Linear(64, 32),
                                 nn.ReLU(inplace=True), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class Branches(nn.Module):
    """Two paths that split and join (a concatenation and a sum), an in-place activation on a value
    the other path still reads, and a functional layer whose weight the trace reads as an attribute."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.mix = nn.Conv2d(16, 8, 1)
        self.head_w = nn.Parameter(torch.randn(10, 8) * 0.3)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        s = self.stem(x)
        a = torch.relu(self.a(s))
        b = self.b(s)
        y = self.mix(torch.cat([a, b], 1)) + s
        y = torch.relu_(y)
        pooled = y.mean((2, 3))
        return self.head(pooled) + nn.functional.linear(pooled, self.head_w)


class Block(nn.Module):
    """A pre-norm transformer block written out (attention with its own projections, softmax,
    residuals, an MLP), on (batch, tokens, features) inputs, pooled to class logits."""

    def __init__(self, d=16, heads=2, classes=5):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.cls = nn.Linear(d, classes)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)

        def split(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = torch.softmax(split(self.q(h)) @ split(self.k(h)).transpose(-1, -2) / math.sqrt(d // self.heads), -1)
        x = x + self.o((att @ split(self.v(h))).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return self.cls(x.mean(1))


@pytest.mark.parametrize("make, shape", [(MLP, (3, 4, 4)), (Branches, (3, 6, 6)), (Block, (6, 16))],
                         ids=["mlp", "branches", "transformer-block"])
def test_other_shapes_of_model_scan_bit_identically(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    data = labelled(model, torch.randn(120, *shape, generator=torch.Generator().manual_seed(1)))
    methods = ["weight_quant", "act_quant", "lowrank"] + (["prune"] if make is not Block else [])
    off, on, record = both(model, data, ScanConfig.defaults(methods, batch_size=40))
    assert on == off
    assert record["used"], record
    assert record.get("probes run in full", 0) == 0


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        if h.detach().sum() > 1e9:  # data-dependent control flow: torch.fx cannot follow it
            h = h * 0
        return self.fc2(torch.relu(h))


def test_a_model_neither_traced_nor_replayed_runs_every_probe_in_full_and_says_why():
    torch.manual_seed(0)
    model = Untraceable().eval()
    model.register_forward_pre_hook(lambda m, args: None)  # could change the input: no replay
    data = labelled(model, torch.randn(60, 3, 2, 2))
    off, on, record = both(model, data, ScanConfig.defaults(["weight_quant"], batch_size=30))
    assert on == off
    assert not record["used"]
    assert "torch.fx" in record["reason"] and "pre-hooks on its top module" in record["reason"]


def test_activations_beyond_the_memory_limit_go_to_disk_and_are_removed_after(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    model = seeded_model("tiny_resnet")
    data, calib = self_labelled(model, 96), self_labelled(model, 32, seed=5)
    cfg = ScanConfig.defaults(["weight_quant"], batch_size=32)
    # room for the check values only: every batch of the sample spills
    off, on, record = both(model, data, cfg, calib, cache_mb=0.05)
    assert on == off
    assert record["batches spilled to disk"] > 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith("sensplan-cache-")]


class AttributeScale(Method):
    """A method whose probe changes what a layer computes without changing a parameter, a buffer,
    a module or a hook: it replaces the layer's ``forward`` on the instance."""

    name = "attribute_scale"
    axis = "weight"
    unit_kind = "layer"
    stage = 30
    default_settings = ({"factor": 0.5},)
    setting_key = "factor"

    def check_setting(self, setting):
        return {"factor": float(setting.get("factor", 0.5))}

    def label(self, setting):
        return f"x{setting['factor']}"

    def effect(self, setting, unit):
        return {}

    def units(self, ctx, settings):
        return {name: "" for name, info in ctx.layers.items() if info["type"] == "Linear"}

    @contextmanager
    def probe(self, ctx, unit, setting) -> Iterator[None]:
        mod = ctx.module(unit)
        plain = type(mod).forward

        def scaled(x):
            return plain(mod, x) * setting["factor"]

        mod.forward = scaled
        try:
            yield
        finally:
            del mod.forward


def test_a_change_no_check_sees_is_caught_and_that_probe_runs_in_full():
    torch.manual_seed(0)
    model = MLP().eval()
    data = labelled(model, torch.randn(60, 3, 4, 4))
    with registered(AttributeScale):
        off, on, record = both(model, data, ScanConfig({"attribute_scale": [{"factor": 0.5}]}, batch_size=30))
    assert on == off
    assert record["probes run in full"] == 3 and not record.get("probes run from a cut")
    assert any(r["drop"] or r["loss_increase"] for r in on)


def test_probe_cut_is_the_first_node_the_probe_changes():
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 16)
    cache = PrefixCache(model, [data.x], data.x[:4])
    assert cache.active
    assert cache._cut_now() == cache.output  # nothing changed: only the output is left to compute
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        w = model.get_submodule(convs[-1]).weight
        w.mul_(0.5)
        late = cache._cut_now()
        model.get_submodule(convs[0]).register_forward_hook(lambda *a: None)
        early = cache._cut_now()
        w.mul_(2.0)
    assert 0 < early < late < cache.output
    assert cache.nodes[late].target == convs[-1] and cache.nodes[early].target == convs[0]


def test_recalibration_leaves_layers_whose_inputs_did_not_move_bit_for_bit():
    model = seeded_model("tiny_resnet")
    calib = self_labelled(model, 40, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = batchnorm_statistics(model, calib)
    assert recalibrate_batchnorm_(model, calib, reference)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_cache_mb_must_not_be_negative():
    from sensplan import UserInputError

    with pytest.raises(UserInputError, match="--cache-mb"):
        ScanConfig(cache_mb=-1)


class SharedTwice(nn.Module):
    """One Linear called twice, and a tied head: a change to either shows at its first use."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.shared = nn.Linear(16, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 16, bias=False)
        self.head.weight = self.mid.weight  # tied

    def forward(self, x):
        h = torch.relu(self.shared(torch.relu(self.inp(x.flatten(1)))))
        h = torch.relu(self.mid(h))
        return self.head(torch.relu(self.shared(h)))


def test_a_module_called_twice_or_a_tied_weight_cuts_at_its_first_use():
    torch.manual_seed(0)
    model = SharedTwice().eval()
    data = labelled(model, torch.randn(80, 3, 2, 2))
    cache = PrefixCache(model, [data.x], data.x[:4])
    assert cache.active
    first_shared = min(i for i, n in enumerate(cache.nodes) if n.target == "shared")
    first_mid = min(i for i, n in enumerate(cache.nodes) if n.target == "mid")
    with torch.no_grad():
        model.shared.weight.mul_(0.5)
        assert cache._cut_now() == first_shared
        model.shared.weight.mul_(2.0)
        model.head.weight.mul_(0.5)  # the tied weight: mid uses it before head does
        assert cache._cut_now() == first_mid
        model.head.weight.mul_(2.0)
    off, on, record = both(model, data, ScanConfig.defaults(["weight_quant", "act_quant"], batch_size=40))
    assert on == off and record.get("probes run in full", 0) == 0


def test_a_model_fx_cannot_trace_is_cut_by_module_replay_bit_identically():
    """Data-dependent control flow stops torch.fx; the scan then replays, per batch, the outputs of
    the modules that returned before the probe's first changed one (module replay), and the rows
    are the same bit for bit."""
    torch.manual_seed(0)
    model = Untraceable().eval()
    data = labelled(model, torch.randn(60, 3, 2, 2))
    off, on, record = both(model, data, ScanConfig.defaults(["weight_quant", "act_quant"], batch_size=30))
    assert on == off
    assert record["used"] and record["mode"].startswith("module replay (torch.fx cannot trace")
    assert record["probes run from a cut"] == len(on) and record.get("probes run in full", 0) == 0
    assert record["batches from the cache"] > 0


@pytest.mark.parametrize("kind, task", [("llama", "perplexity"), ("gpt2", "perplexity"), ("mixtral", "perplexity"),
                                        ("bert", "classification")])
def test_hugging_face_models_scan_bit_identically_through_module_replay(tmp_path, kind, task):
    """transformers' models do not trace with torch.fx (masks and caches branch on their inputs):
    module replay cuts them at the first changed module instead, heads and MLP groups included."""
    pytest.importorskip("transformers")
    from sensplan.sensitivity import load_model
    from tests import hf_tiny

    spec, data = hf_tiny.text_model(kind, tmp_path, n=12, seq_len=16)
    if kind == "bert":  # a sequence classifier: its own predictions as labels
        model = load_model(spec)
        with torch.no_grad():
            data = EvalSet(data.x, model(data.x).argmax(1), ["a", "b", "c"], data.description, data.indices)
    model = load_model(spec)
    settings = {"weight_quant": [{"bits": 4}, {"bits": 3, "group": 32}], "prune": [{"ratio": 0.5}]}
    off = scan(model, data, ScanConfig(settings, batch_size=6, cache_mb=0, task=task), model_spec=spec,
               progress=False)
    on = scan(model, data, ScanConfig(settings, batch_size=6, task=task), model_spec=spec, progress=False)
    record = on.data["provenance"]["prefix_cache"]
    assert rows(on) == rows(off) and len(rows(on)) > 8
    assert record["used"] and record["mode"].startswith("module replay"), record
    assert record.get("probes run in full", 0) == 0
    assert record["batches from the cache"] >= record["batches cached"]


class Saver(nn.Module):
    """A layer that keeps what it computed (an attribute set in forward) for others to read."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 16)

    def forward(self, x):
        h = self.fc(x)
        self.saved = h.mean(0, keepdim=True)
        return h


class Stateful(nn.Module):
    """Untraceable (data-dependent control flow), with a module whose saved attribute is read after
    it returns (``saved``), or a module that some batches call twice (``twice``): module replay
    must not give a stale or a reused value."""

    def __init__(self, saved: bool, twice: bool):
        super().__init__()
        self.first, self.fc2, self.fc3 = Saver(), nn.Linear(16, 16), nn.Linear(16, 4)
        self.read_saved, self.twice = saved, twice

    def forward(self, x):
        h = self.first(x.flatten(1))
        if h.detach().sum() > 1e9:  # data-dependent control flow: torch.fx cannot follow it
            h = h * 0
        h = self.fc2(torch.relu(h)) + (self.first.saved if self.read_saved else 0)
        if self.twice and bool(x[0, 0, 0, 0] > 0):
            h = h + self.fc2(torch.relu(h))
        return self.fc3(h)


@pytest.mark.parametrize("saved, twice", [(True, False), (False, True)], ids=["saved-attribute", "called-twice"])
def test_module_replay_never_gives_a_stale_or_reused_value(saved, twice):
    torch.manual_seed(0)
    model = Stateful(saved, twice).eval()
    x = torch.randn(60, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    x[:30, 0, 0, 0] = -1.0  # the check inputs and the first batch call fc2 once; the second batch twice
    x[30, 0, 0, 0] = 1.0
    data = labelled(model, x)
    off, on, record = both(model, data, ScanConfig.defaults(["weight_quant"], batch_size=30))
    assert on == off
    assert record["used"] and record["mode"].startswith("module replay")
    if saved:  # replaying `first` leaves its attribute stale: the check sees it, those probes run whole
        assert record.get("probes run in full", 0) >= 2
    else:  # the second batch calls fc2 twice: its outputs are never kept, so fc2 is never replayed there
        assert record["batches not cached (a module ran other than once)"] >= 1


def test_module_replay_keeps_check_outputs_only_of_modules_a_probe_can_replay(tmp_path):
    pytest.importorskip("transformers")
    from sensplan.sensitivity import load_model
    from tests import hf_tiny

    spec, data = hf_tiny.text_model("llama", tmp_path, n=4, seq_len=16)
    cache = PrefixCache(load_model(spec), [data.x], data.x[:2])
    calls = cache.calls
    assert cache.active and calls is not None
    # the logits come back three times (the wrapper, the LM, its head): kept once, for the root
    assert {"", "model.model.embed_tokens", "model.model.layers.0"} <= set(calls.outputs)
    assert "model.lm_head" not in calls.outputs and "model" not in calls.outputs
    assert set(calls.outputs) == calls.replayable
    # a limit below one sample's outputs: no check values, and probes are counted unchecked
    small = PrefixCache(load_model(spec), [data.x], data.x[:2], limit_mb=0.01)
    assert small.active and small.calls is not None and not small.calls.outputs


def test_a_module_that_refuses_a_patched_forward_leaves_the_model_as_it_was():
    """Module replay patches ``forward`` on instances; a module that refuses it (a property, as a
    scripted module's is) turns replay off, and every module it patched before is restored."""
    from sensplan.sensitivity._prefix import _patched

    class Stubborn(nn.Linear):
        @property
        def forward(self):  # no setter: assigning it raises
            return super().forward

    model = nn.Sequential(nn.Linear(4, 4), Stubborn(4, 4), nn.Linear(4, 2))
    with pytest.raises(AttributeError), _patched(model, {n: (lambda f: f) for n in ("0", "1", "2")}):
        pass
    assert all("forward" not in m.__dict__ for m in model.modules())
    x = torch.randn(3, 4)
    cache = PrefixCache(model, [x], x[:2])
    assert cache.active  # fx traces it: the graph is used, replay not needed
    assert all("forward" not in m.__dict__ for m in model.modules())


class Chain(nn.Module):
    """Untraceable, a chain of layers; ``skip``: the code between calls also reads the first
    layer's output after the second one (a residual that no recording of module inputs sees);
    on batches whose first value is positive, ``write`` writes to that output in place, and
    ``read`` adds it to the last layer's."""

    def __init__(self, depth: int = 6, skip: bool = False, write: bool = False, read: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(depth))
        self.inp, self.out = nn.Linear(12, 16), nn.Linear(16, 4)
        self.skip, self.write, self.read = skip, write, read

    def forward(self, x):
        h = self.inp(x.flatten(1))
        if h.detach().sum() > 1e9:  # data-dependent control flow: torch.fx cannot follow it
            h = h * 0
        first = h = self.layers[0](h)
        for layer in self.layers[1:]:
            h = layer(h)
        if self.write and bool(x[0, 0, 0, 0] > 0):
            first.mul_(1.0)
        if self.read and bool(x[0, 0, 0, 0] > 0):
            h = h + first
        return self.out(h + first if self.skip else h)


def test_module_replay_keeps_placeholders_for_outputs_nothing_after_the_cut_reads():
    """At a cut in layer k of a chain, only layer k-1's output is read after it: the outputs of
    the layers before are kept as one-element placeholders, not as tensors, and the rows are the
    same bit for bit."""
    torch.manual_seed(0)
    model = Chain().eval()
    x = torch.randn(64, 3, 2, 2)
    cache = PrefixCache(model, [x], x[:2])
    calls = cache.calls
    assert cache.active and calls is not None
    last = calls.enter["layers.5"]
    assert calls.dead(last) == {"inp", "layers.0", "layers.1", "layers.2", "layers.3"}
    assert cache._checks(last) and not cache._no_dead
    cache.cut = last
    with torch.inference_mode():
        want = model(x[:32])
        assert torch.equal(cache.forward(x[:32]), want)
        (entry,) = cache.entries.values()
        assert entry.dead and entry.nbytes == 32 * 16 * 4 + 5 * 4  # layers.4's output, and 5 one-element NaNs
        assert torch.isnan(entry.values["layers.0"]).all() and not torch.isnan(entry.values["layers.4"]).any()
        assert torch.equal(cache.forward(x[:32]), want)  # from the entry, placeholders included
    data = labelled(model, x)
    off, on, record = both(model, data, ScanConfig.defaults(["weight_quant"], batch_size=32))
    assert on == off and record["batches from the cache"] > 0 and record.get("probes run in full", 0) == 0


@pytest.mark.parametrize("how", ["read", "written", "read-on-some-batches"])
def test_module_replay_keeps_an_output_the_code_between_calls_reads(how):
    """A residual summed by the code between module calls reads an output no module was handed
    after the cut: the placeholder's NaN reaches the check, and placeholders are turned off. An
    in-place write, or a read, that only some batches make (not the check inputs) fails the
    replay of that batch, or makes its output NaN: placeholders are then turned off, and the batch
    runs in full. The rows are the same bit for bit every way."""
    torch.manual_seed(0)
    model = Chain(depth=4, skip=how == "read", write=how == "written", read=how == "read-on-some-batches").eval()
    x = torch.randn(64, 3, 2, 2)
    x[:32, 0, 0, 0] = -1.0  # the check inputs and the first batch do not write; the second batch does
    x[32, 0, 0, 0] = 1.0
    cache = PrefixCache(model, [x], x[:2])
    calls = cache.calls
    cut = calls.enter["layers.3"]
    assert "layers.0" in calls.dead(cut)
    data = labelled(model, x)
    off, on, record = both(model, data, ScanConfig.defaults(["weight_quant"], batch_size=32))
    assert on == off and record.get("probes run in full", 0) == 0
    assert record["placeholders turned off (an output thought unread was read)"] == 1


def test_module_replay_keeps_no_placeholders_when_no_check_would_test_them():
    """When the check values exceed a quarter of --cache-mb, probes run from their cut unchecked:
    then no output is kept as a placeholder (a read of one would go unseen)."""
    torch.manual_seed(0)
    model = Chain(depth=4, skip=True).eval()
    data = labelled(model, torch.randn(64, 3, 2, 2))
    off, on, record = both(model, data, ScanConfig.defaults(["weight_quant"], batch_size=32), cache_mb=0.001)
    assert on == off and record["probes unchecked (the check values exceed a quarter of --cache-mb)"] > 0


def test_the_decoy_run_stops_even_when_the_model_catches_exceptions():
    """A model that falls back on ``except Exception`` around a module call must not catch the
    stop at the cut (its fallback would change its state for good)."""

    class Careful(Chain):
        def __init__(self):
            super().__init__(depth=3)
            self.fallbacks = 0

        def forward(self, x):
            h = self.inp(x.flatten(1))
            if h.detach().sum() > 1e9:
                h = h * 0
            for layer in self.layers:
                try:
                    h = layer(h)
                except Exception:  # noqa: BLE001 - the model's own fallback
                    self.fallbacks += 1
            return self.out(h)

    torch.manual_seed(0)
    model = Careful().eval()
    x = torch.randn(8, 3, 2, 2)
    calls = PrefixCache(model, [x], x[:2]).calls
    calls.run_until(x[2:4], calls.enter["layers.1"])
    assert model.fallbacks == 0


def test_the_decoy_run_of_a_check_stops_at_the_cut():
    """The check's run on other samples only has to leave the replayed modules' state (those below
    the cut) from another batch: it stops where the first module at or after the cut is entered."""
    torch.manual_seed(0)
    model = Chain(depth=4).eval()
    x = torch.randn(8, 3, 2, 2)
    calls = PrefixCache(model, [x], x[:2]).calls
    ran = []
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: ran.append(n)) for n, m in model.named_modules() if n]
    calls.run_until(x[2:4], calls.enter["layers.2"])
    for h in handles:
        h.remove()
    # (hooks run around a patched forward: layers.2's pre-hook runs, its forward does not)
    assert ran == ["inp", "layers.0", "layers.0.0", "layers.0.1", "layers.1", "layers.1.0", "layers.1.1", "layers.2"]
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_the_prefix_cache_keeps_fingerprints_not_copies_of_the_weights():
    """A probe's cut comes from what changed, compared with fingerprints of the weights (a copy
    would double a language model's memory): a change through ``.data`` (which no version counter
    sees) is placed, and undoing it places nothing."""
    torch.manual_seed(0)
    model = Chain(depth=4).eval()
    x = torch.randn(8, 3, 2, 2)
    cache = PrefixCache(model, [x], x[:2])
    assert not any(isinstance(v, torch.Tensor) for _, fp in cache.tensors.values() for v in fp)
    w = model.layers[2][0].weight
    old = w.data[1, 3].item()
    w.data[1, 3] = old + 0.5
    assert cache._cut_now() == cache.calls.enter["layers.2.0"]
    w.data[1, 3] = old
    assert cache._cut_now() == cache.output


def test_fingerprints_read_views_at_any_offset_quantized_and_sparse_tensors():
    from sensplan.sensitivity._prefix import _fingerprint

    flat = torch.randn(41)
    view = flat[1:]  # 4 bytes into its storage: not an int64 view
    before = _fingerprint(view)
    flat[5] += 1
    assert _fingerprint(view) != before
    with warnings.catch_warnings():  # torch's quantized tensors are deprecated; models may still hold them
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.randn(6), 0.1, 0, torch.qint8)
        assert _fingerprint(q) == _fingerprint(q.clone())
        assert _fingerprint(q) != _fingerprint(torch.quantize_per_tensor(q.dequantize(), 0.2, 0, torch.qint8))
    sparse = torch.eye(4).to_sparse()
    assert _fingerprint(sparse) == _fingerprint(torch.eye(4).to_sparse())
    assert _fingerprint(sparse) != _fingerprint(sparse * 2)


def test_module_replay_records_a_model_that_hands_sparse_tensors_between_modules():
    """A sparse tensor has no storage to point at: the recording of who read what skips it, so
    replay stays on (it turned the cache off, for a sparse output and for a sparse input)."""

    class ToSparse(nn.Module):
        def forward(self, x):
            return x.to_sparse()

    class FromSparse(nn.Module):
        def forward(self, s):
            return s.to_dense()

    class Sparse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.s, self.d, self.b = nn.Linear(12, 8), ToSparse(), FromSparse(), nn.Linear(8, 4)

        def forward(self, x):
            h = self.a(x.flatten(1))
            if h.detach().sum() > 1e9:  # data-dependent control flow: torch.fx cannot follow it
                h = h * 0
            return self.b(self.d(self.s(h)))

    torch.manual_seed(0)
    model = Sparse().eval()
    x = torch.randn(8, 3, 2, 2)
    cache = PrefixCache(model, [x], x[:2])
    assert cache.active and cache.calls is not None, cache.reason
