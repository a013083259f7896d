"""The exports fed to the tools they are for, wherever the tool installs (the ``tools`` extra; each
test skips without its tool): NNCF's ``compress_weights`` and ModelOpt's ``mtq.quantize`` are called
exactly as docs/exporters.md tells a user to, and the returned model is checked layer by layer
against the plan: which layers got compressed, at which bits and group size, and that the plan's
float layers stayed float."""

from __future__ import annotations

import json

import pytest
import torch

from sensplan.planner.export import export_plan
from sensplan.sensitivity import ModelSpec, ScanConfig, load_model, scan
from tests.conftest import seeded_model, self_labelled
from tests.test_export import hand_plan

WQ = {"weight_quant": [{"bits": 8}, {"bits": 4}], "act_quant": [{"calib": "minmax", "bits": 8}]}


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """tiny_resnet, its weight-quantization scan saved where the plan records it (the NNCF export
    reads layer types and sizes from it)."""
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 32)
    calib = self_labelled(model, 16, seed=9)
    table = scan(model, data, ScanConfig(WQ), calib=calib, model_spec=ModelSpec("sensplan:tiny_resnet"),
                 progress=False)
    table = table.save(tmp_path_factory.mktemp("cnn") / "scan.json")
    return model, data, table


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama (two decoder layers), layers.0 scanned; its scan saved."""
    pytest.importorskip("transformers")
    from tests import hf_tiny

    root = tmp_path_factory.mktemp("llama")
    spec, data = hf_tiny.text_model("llama", root, n=2)
    model = load_model(spec)
    cfg = ScanConfig({"weight_quant": [{"bits": 8}, {"bits": 4, "group": 32},
                                       {"bits": 4, "group": 32, "zero_point": True}]},
                     task="perplexity", units=("*layers.0.*",), check_samples=2)
    table = scan(model, data, cfg, model_spec=spec, progress=False).save(root / "scan.json")
    from transformers import AutoModelForCausalLM

    def fresh():
        return AutoModelForCausalLM.from_pretrained(spec.source.removeprefix("hf:")).eval()

    return fresh, data, table


# -- NNCF ------------------------------------------------------------------------------------------
def _nncf_compressed(model) -> dict[str, tuple[int, int, bool]]:
    """Module name -> (bits, group size (0: per output row), symmetric) of every weight NNCF
    compressed: its decompressor hooks ``<module>:weight__0`` and the shape of their scales."""
    hooks = getattr(model, "__nncf_hooks", None)
    out = {}
    for key, mods in (hooks.post_hooks.items() if hooks is not None else []):
        name = key.rpartition(":")[0].replace(":", ".")  # "block:conv1:weight__0": block.conv1.weight
        (dec,) = mods.values()
        kind = type(dec).__name__  # INT4SymmetricWeightsDecompressor, INT8AsymmetricWeightsDecompressor ...
        bits = 4 if kind.startswith("INT4") else 8 if kind.startswith("INT8") else -1
        in_dim = getattr(dict(model.named_modules())[name], "in_features", None)  # the weight is packed now
        scale = dec._scale
        grouped = in_dim is not None and scale.dim() == 3  # [out, groups, 1]; per row: [out, 1]
        out[name] = (bits, in_dim // scale.shape[1] if grouped else 0, "Symmetric" in kind)
    return out


def _planned(plan, prefix: str = "") -> dict[str, tuple[int, int, bool] | None]:
    out: dict[str, tuple[int, int, bool] | None] = {}
    for c in plan.variant()["choices"].values():
        if c["kind"] == "layer" and c["axis"] == "weight":
            e = c["effect"] or {}
            out[c["unit"].removeprefix(prefix)] = ((e["weight_bits"], e.get("group_size") or 0,
                                                   not e.get("zero_point_bits")) if e else None)
    return out


def test_nncf_compresses_exactly_the_cnn_plans_layers(cnn, tmp_path):
    nncf = pytest.importorskip("nncf")
    from sensplan.planner.export.nncf import nncf_arguments

    model, data, table = cnn
    convs = [u for u, v in table.layers.items() if v["type"] == "Conv2d"]
    plan = hand_plan(table, [(convs[0], "weight_quant", {"bits": 8}), (convs[2], "weight_quant", {"bits": 8}),
                             ("head", "weight_quant", {"bits": 4})])  # convs[1], convs[3] float
    export_plan(plan, "nncf", tmp_path / "nncf.json")
    doc = json.loads((tmp_path / "nncf.json").read_text())
    a = doc["compress_weights"]
    # the 8-bit convolutions go to the backup mode, which NNCF's ratio does not count: exact
    assert (a["mode"], a["backup_mode"], a["ratio"], doc["exact"]) == ("INT4_SYM", "INT8_SYM", 1.0, True)
    assert set(doc["ignored_modules"]) == {convs[1], convs[3]}
    x = data.x[:1]
    theirs = nncf.compress_weights(_copy(model), **nncf_arguments(tmp_path / "nncf.json", _copy(model), x))
    want = {n: w for n, w in _planned(plan).items() if w}
    assert _nncf_compressed(theirs) == {n: (b, g, s) for n, (b, g, s) in want.items()}
    for name in doc["ignored_modules"]:
        assert dict(theirs.named_modules())[name].weight.dtype == torch.float32


def test_nncf_refuses_a_4_bit_convolution(cnn, tmp_path):
    from sensplan._errors import UserInputError

    model, data, table = cnn
    conv = next(u for u, v in table.layers.items() if v["type"] == "Conv2d")
    plan = hand_plan(table, [(conv, "weight_quant", {"bits": 4}), ("head", "weight_quant", {"bits": 4})])
    with pytest.raises(UserInputError, match="convolutions only in its 8-bit backup mode"):
        export_plan(plan, "nncf", tmp_path / "nncf.json")


@pytest.mark.parametrize("mix", [False, True])
def test_nncf_on_the_tiny_llama(llama, tmp_path, mix):
    """Only grouped 4-bit layers: exactly the plan's layers. A 4/8-bit mix: the plan's layers (NNCF
    picks which get 4 bits), the 4-bit ones in the plan's groups, the share of 4-bit weights kept."""
    nncf = pytest.importorskip("nncf")
    from sensplan.planner.export.nncf import nncf_arguments

    fresh, data, table = llama
    layers = [u for u in table.layers if ".layers.0." in u]
    picks = [(u, "weight_quant", {"bits": 4, "group": 32}) for u in layers[:4]]
    if mix:
        picks += [(layers[4], "weight_quant", {"bits": 8}), (layers[5], "weight_quant", {"bits": 8})]
    plan = hand_plan(table, picks)
    export_plan(plan, "nncf", tmp_path / "nncf.json")
    doc = json.loads((tmp_path / "nncf.json").read_text())
    assert doc["exact"] is (not mix)
    assert "lm_head" in doc["ignored_modules"] and "model.layers.1.mlp.up_proj" in doc["ignored_modules"]
    x = {"input_ids": torch.arange(8).unsqueeze(0)}
    model = fresh()
    got = _nncf_compressed(nncf.compress_weights(model, **nncf_arguments(tmp_path / "nncf.json", model, x)))
    want = {n: w for n, w in _planned(plan, "model.").items() if w}
    assert set(got) == set(want)  # the ignored ones (layers.1 and lm_head too) stay float
    if not mix:
        assert got == want
        return
    assert all(g in ((4, 32, True), (8, 0, True)) for g in got.values())
    size = {n: m.weight.numel() for n, m in fresh().named_modules() if n in want}
    four = sum(size[n] for n, g in got.items() if g[0] == 4) / sum(size.values())
    assert four == pytest.approx(doc["compress_weights"]["ratio"], abs=0.15)


def test_nncf_ignores_no_planned_layer_of_a_model_with_a_root_parameter(tmp_path):
    """A parameter of the root module (a ViT's ``cls_token``) has no module prefix; activation nodes
    ("x", "/relu/0") have none either, and must not count as reading it (every node was ignored)."""
    pytest.importorskip("nncf")
    from torch import nn

    from sensplan.planner.export.nncf import nncf_arguments

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(self.fc2(torch.relu(self.fc1(x)))) * self.scale

    (tmp_path / "nncf.json").write_text(json.dumps({
        "compress_weights": {"mode": "INT8_SYM", "all_layers": True}, "ignored_modules": ["fc3"],
        "layers": {"fc1": "int8", "fc2": "int8", "fc3": "float (ignored_modules)"}}))
    names = nncf_arguments(tmp_path / "nncf.json", Net().eval(), torch.randn(2, 64))["ignored_scope"].names
    assert "fc3/linear/0" in names
    assert not {"fc1/linear/0", "fc2/linear/0"} & set(names)


def _copy(model):
    import copy

    return copy.deepcopy(model).eval()


# -- ModelOpt --------------------------------------------------------------------------------------
def _mtq():
    import warnings

    with warnings.catch_warnings():  # its import warns about untested transformers releases, torch.jit
        warnings.simplefilter("ignore")
        return pytest.importorskip("modelopt.torch.quantization")


def _check_modelopt(model, want: dict[str, tuple[int, int, int]]) -> None:
    """Every quantizer ModelOpt inserted is enabled exactly where ``want`` (module -> weight bits,
    group size (0: per output row), input bits (32: float)) says, with those attributes, and the
    fake-quantized weights take at most 2**bits values per row or group."""
    seen = set()
    for name, mod in model.named_modules():
        if not hasattr(mod, "weight_quantizer"):
            continue
        seen.add(name)
        bits, group, act = want.get(name, (32, 0, 32))
        wq, iq = mod.weight_quantizer, mod.input_quantizer
        assert wq.is_enabled is (bits < 32), name
        assert iq.is_enabled is (act < 32), name
        assert not mod.output_quantizer.is_enabled, name
        if act < 32:
            assert (iq.num_bits, iq.axis) == (act, None) and iq.amax is not None, name  # calibrated
        if bits == 32:
            continue
        assert wq.num_bits == bits, name
        if group:
            assert wq.block_sizes == {-1: group}, name
        else:
            assert wq.axis == 0 and not wq.block_sizes, name
        with torch.no_grad():
            q = wq(mod.weight)
        rows = q.reshape(q.shape[0], -1)
        chunks = rows.reshape(-1, group) if group else rows
        assert max(len(torch.unique(c)) for c in chunks) <= 2 ** bits, name
        assert not torch.equal(q, mod.weight), name
    assert set(want) <= seen


@pytest.mark.parametrize("entries", [True, False])
def test_modelopt_quantizes_exactly_the_cnn_plans_tensors(cnn, tmp_path, entries):
    mtq = _mtq()
    from sensplan.planner.export.modelopt import load_modelopt_config

    model, data, table = cnn
    convs = [u for u, v in table.layers.items() if v["type"] == "Conv2d"]
    a8 = {"calib": "minmax", "bits": 8}
    plan = hand_plan(table, [(convs[0], "weight_quant", {"bits": 8}), (convs[0], "act_quant", a8),
                             (convs[2], "weight_quant", {"bits": 4}), ("head", "act_quant", a8),
                             ("head", "weight_quant", {"bits": 8})])
    export_plan(plan, "modelopt", tmp_path / "mo.json")
    config = load_modelopt_config(str(tmp_path / "mo.json"), entries=entries)
    x = data.x[:8]
    ours = _copy(model)
    if entries:  # the list form ModelOpt 0.4x takes without a warning
        quantized = mtq.quantize(ours, config, lambda m: m(x))
    else:
        with pytest.warns(DeprecationWarning, match="legacy dict format"):
            quantized = mtq.quantize(ours, config, lambda m: m(x))
    _check_modelopt(quantized, {convs[0]: (8, 0, 8), convs[2]: (4, 0, 32), "head": (8, 0, 8)})


def test_modelopt_quantizes_exactly_the_llama_plans_weights(llama, tmp_path):
    mtq = _mtq()
    from sensplan.planner.export.modelopt import load_modelopt_config

    fresh, data, table = llama
    layers = [u for u in table.layers if ".layers.0." in u]
    plan = hand_plan(table, [(layers[0], "weight_quant", {"bits": 8}),
                             *[(u, "weight_quant", {"bits": 4, "group": 32}) for u in layers[1:5]]])
    export_plan(plan, "modelopt", tmp_path / "mo.json")
    ids = torch.arange(8).unsqueeze(0)
    quantized = mtq.quantize(fresh(), load_modelopt_config(str(tmp_path / "mo.json"), entries=True),
                             lambda m: m(input_ids=ids))
    want = {layers[0].removeprefix("model."): (8, 0, 32)}
    want |= {u.removeprefix("model."): (4, 32, 32) for u in layers[1:5]}
    _check_modelopt(quantized, want)


# -- AutoRound -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """A tiny Llama whose projections are multiples of 32 on both sides (AutoRound keeps any other
    Linear float), layers.0 scanned with per-row and grouped weights (with zero points too)."""
    tf = pytest.importorskip("transformers")
    from sensplan.sensitivity import DataSpec, load_eval_set
    from tests import hf_tiny

    root = tmp_path_factory.mktemp("llama32")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, tie_word_embeddings=False)
    folder = hf_tiny.save("llama", root / "llama", model=tf.LlamaForCausalLM(cfg))
    (root / "corpus.txt").write_text(hf_tiny.corpus()[:20000])
    data = load_eval_set(DataSpec("text", str(root / "corpus.txt"), tokenizer=str(folder), seq_len=16), n=2)
    spec = ModelSpec(f"hf:{folder}")
    scfg = ScanConfig({"weight_quant": [{"bits": 8}, {"bits": 4, "group": 32},
                                        {"bits": 4, "group": 32, "zero_point": True}]},
                      task="perplexity", units=("*layers.0.*",), check_samples=2)
    table = scan(load_model(spec), data, scfg, model_spec=spec, progress=False).save(root / "scan.json")
    return folder, table


def _auto_round():
    """``auto_round``, imported with logging's own Logger class: NNCF's import sets its NNCFLogger as
    every later logger's class, whose ``warning_once`` AutoRound's calls do not fit (a TypeError)."""
    import logging

    cls = logging.getLoggerClass()
    logging.setLoggerClass(logging.Logger)
    try:
        return pytest.importorskip("auto_round")
    finally:
        logging.setLoggerClass(cls)


def test_autoround_resolves_each_layer_to_its_planned_format(llama32, tmp_path):
    AutoRound = _auto_round().AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, table = llama32
    layers = [u for u in table.layers if ".layers.0." in u]
    plan = hand_plan(table, [(layers[0], "weight_quant", {"bits": 8}),
                             *[(u, "weight_quant", {"bits": 4, "group": 32}) for u in layers[1:4]],
                             (layers[4], "weight_quant", {"bits": 4, "group": 32, "zero_point": True})])
    export_plan(plan, "autoround", tmp_path / "ar.json")
    cfg = json.loads((tmp_path / "ar.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    ar = AutoRound(model, AutoTokenizer.from_pretrained(folder), bits=cfg["bits"], group_size=cfg["group_size"],
                   sym=cfg["sym"], layer_config=cfg["layer_config"], iters=0)
    ar.configure_layer_config()  # what quantize() would do to each layer
    want = {n: (w[0], w[1] or -1, w[2]) if w else None for n, w in _planned(plan, "model.").items()}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        got = ar.layer_config.get(name) or {"bits": 16}
        if want.get(name) is None:  # float in the plan, or never scanned (layers.1, lm_head)
            assert got["bits"] >= 16, name
        else:
            assert (got["bits"], got["group_size"], got["sym"], got["data_type"]) == (*want[name], "int"), name


def test_autoround_refuses_a_layer_it_would_keep_float(llama, tmp_path):
    """The usual tiny Llama's k_proj is 16 x 32: AutoRound would keep it float whatever the file says."""
    from sensplan._errors import UserInputError

    fresh, data, table = llama
    k_proj = next(u for u in table.layers if u.endswith("layers.0.self_attn.k_proj"))
    plan = hand_plan(table, [(k_proj, "weight_quant", {"bits": 8})])
    with pytest.raises(UserInputError, match=r"AutoRound keeps a layer whose weight shape \(16, 32\)"):
        export_plan(plan, "autoround", tmp_path / "ar.json")
    # without the plan's scan the shapes are unknown: the export goes through and says what it did not check
    import copy

    from sensplan.planner import Plan

    data = copy.deepcopy(dict(plan.data))
    data["scan"] = {**data["scan"], "path": str(tmp_path / "gone" / "scan.json")}
    out = export_plan(Plan(data), "autoround", tmp_path / "ar.json")
    assert any("was not found" in n and "shapes" in n and "not checked" in n for n in out.notes)


# -- llm-compressor (its matching and scheme engine, compressed-tensors) ---------------------------
def test_compressed_tensors_attaches_the_recipes_schemes_to_exactly_the_planned_layers(llama, tmp_path):
    """llm-compressor itself does not install beside torch 2.14.1 (it pins other torch and
    transformers releases); its QuantizationModifier hands ``config_groups`` and ``ignore`` to
    compressed-tensors' ``apply_quantization_config``, which is fed the recipe here."""
    yaml = pytest.importorskip("yaml")
    ct = pytest.importorskip("compressed_tensors.quantization")
    fresh, data, table = llama
    layers = [u for u in table.layers if ".layers.0." in u]
    plan = hand_plan(table, [(layers[0], "weight_quant", {"bits": 8}),
                             *[(u, "weight_quant", {"bits": 4, "group": 32}) for u in layers[1:4]],
                             (layers[4], "weight_quant", {"bits": 4, "group": 32, "zero_point": True})])
    export_plan(plan, "llm-compressor", tmp_path / "recipe.yaml")
    mod = yaml.safe_load((tmp_path / "recipe.yaml").read_text())["quant_stage"]["quant_modifiers"]
    mod = mod["QuantizationModifier"]
    config = ct.QuantizationConfig(config_groups=mod["config_groups"], ignore=mod["ignore"])
    model = fresh()
    ct.apply_quantization_config(model, config)
    want = {n: w for n, w in _planned(plan, "model.").items() if w}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        scheme = getattr(m, "quantization_scheme", None)
        if name not in want:  # float in the plan, never scanned (layers.1), or lm_head
            assert scheme is None, name
            continue
        w = scheme.weights
        bits, group, sym = want[name]
        assert (w.num_bits, w.type, w.symmetric, w.group_size or 0) == (bits, "int", sym, group), name
        assert w.strategy == ("group" if group else "channel") and scheme.input_activations is None, name
