"""Mixture-of-experts models: transformers' fused experts become one Linear pair per expert (the
same outputs), each expert's weights are units and its intermediate channels a pruning group, MACs
count top_k of the experts per token, and a tiny Mixtral runs scan, plan and apply end to end."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sensplan.cli import main  # noqa: E402
from sensplan.sensitivity import DataSpec, ModelSpec, load_eval_set, load_model  # noqa: E402
from sensplan.sensitivity._groups import channel_graph, check_group, count_macs  # noqa: E402
from sensplan.sensitivity._moe import SplitExperts, fuse_experts_, split_experts_  # noqa: E402

from . import hf_tiny  # noqa: E402

EXPERTS, TOP_K, WIDTH, HIDDEN = 4, 2, 24, 32


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_tiny.save("mixtral", tmp_path_factory.mktemp("hf") / "mixtral")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(hf_tiny.corpus()[:60000])
    return p


def _text(folder: Path, corpus: Path, n: int = 8):
    return load_eval_set(DataSpec("text", str(corpus), tokenizer=str(folder), seq_len=32), n=n)


def test_the_fused_experts_split_into_equal_linear_pairs(mixtral: Path, corpus: Path) -> None:
    ours = load_model(ModelSpec(f"hf:{mixtral}"))
    theirs = transformers.MixtralForCausalLM.from_pretrained(mixtral).eval()
    assert not [n for n, p in ours.named_parameters() if p.dim() == 3]  # no fused weight is left
    assert ours.experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    expert = ours.get_submodule("model.model.layers.1.mlp.experts.3")
    assert expert.gate_up_proj.weight.shape == (2 * WIDTH, HIDDEN) and expert.down_proj.weight.shape == (HIDDEN, WIDTH)
    fused = theirs.model.layers[1].mlp.experts
    assert torch.equal(expert.gate_up_proj.weight, fused.gate_up_proj[3])
    x = _text(mixtral, corpus, n=4).x
    with torch.no_grad():
        ref = theirs(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
        assert torch.allclose(ours(x), ref, atol=1e-5)
    # and back: the fused layout again, with the same outputs
    back = ours.model
    assert fuse_experts_(back, ours.experts) is None
    assert type(back.model.layers[0].mlp.experts) is type(fused)
    with torch.no_grad():
        assert torch.allclose(back(input_ids=x[:, 0], attention_mask=x[:, 1]).logits, ref, atol=1e-5)


def test_another_experts_layout_is_left_fused() -> None:
    """An experts module with biases (GPT-OSS-like) is not split: its weights are not units."""

    class Biased(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 8, 4))
            self.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 4))
            self.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(2, 8))
            self.act_fn = torch.nn.SiLU()

    owner = torch.nn.Module()
    owner.experts = Biased()
    assert split_experts_(owner) == [] and isinstance(owner.experts, Biased)


def test_each_expert_is_a_pruning_group_of_gate_up_and_down(mixtral: Path, corpus: Path) -> None:
    m = load_model(ModelSpec(f"hf:{mixtral}"))
    x = _text(mixtral, corpus).x
    g = channel_graph(m, x[:1])
    info = {gid: g.describe(gid) for gid in g.group_ids()}
    experts = {gid: d for gid, d in info.items() if "expert" in d}
    assert len(experts) == 2 * EXPERTS
    gid = "model.model.layers.1.mlp.experts.2.gate_up_proj"
    assert experts[gid]["label"] == "layer 1 expert 2 MLP" and g.channels(gid) == WIDTH
    chk = check_group(m, g, gid, WIDTH // 3, x)  # zeroing == removal, on the real model
    assert chk.ok, chk.reason
    with torch.no_grad(), g.zeroed(gid, [0, 5]):
        zeroed = m(x)
    g.prune_(gid, [0, 5])
    expert = m.get_submodule("model.model.layers.1.mlp.experts.2")
    assert expert.gate_up_proj.out_features == 2 * (WIDTH - 2) and expert.down_proj.in_features == WIDTH - 2
    with torch.no_grad():
        assert torch.allclose(m(x), zeroed, atol=1e-5)
    # a transformers config holds one expert width: the fused layout cannot be written back
    why = fuse_experts_(m.model, m.experts)
    assert why is not None and "different widths (22 to 24)" in why


def test_experts_pruned_to_one_width_save_as_a_transformers_folder(mixtral: Path, corpus: Path,
                                                                    tmp_path: Path) -> None:
    """Every expert at one width is what the config's expert width (Mixtral: intermediate_size)
    says: the folder is written fused and reloads with the same outputs."""
    m = load_model(ModelSpec(f"hf:{mixtral}"))
    x = _text(mixtral, corpus, n=4).x
    g = channel_graph(m, x[:1])
    for gid in (gid for gid in g.group_ids() if "expert" in g.describe(gid)):
        g.prune_(gid, [1, 7, 20, 22])
    with torch.no_grad():
        ours = m(x)
    saved = m.export_pretrained(tmp_path / "hf")
    assert saved["saved"], saved
    back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert back.config.intermediate_size == WIDTH - 4
    assert back.model.layers[1].mlp.experts.down_proj.shape == (EXPERTS, HIDDEN, WIDTH - 4)
    with torch.no_grad():
        assert torch.allclose(back(input_ids=x[:, 0], attention_mask=x[:, 1]).logits, ours, atol=1e-5)
    # one expert narrower than the rest: no config says it
    g.prune_("model.model.layers.0.mlp.experts.1.gate_up_proj", [0])
    refused = m.export_pretrained(tmp_path / "hf2")
    assert not refused["saved"] and "different widths (19 to 20)" in refused["reason"]


def test_expert_macs_count_top_k_of_the_experts_per_token(mixtral: Path, corpus: Path) -> None:
    m = load_model(ModelSpec(f"hf:{mixtral}"))
    x = _text(mixtral, corpus, n=2).x
    macs = count_macs(m, x)
    tokens = 32  # per sample
    block = "model.model.layers.0.mlp.experts"
    per_expert = {e: macs[f"{block}.{e}.gate_up_proj"] + macs[f"{block}.{e}.down_proj"] for e in range(EXPERTS)}
    weights = 2 * WIDTH * HIDDEN + HIDDEN * WIDTH
    assert set(per_expert.values()) == {round(tokens * TOP_K / EXPERTS * 2 * WIDTH * HIDDEN)
                                        + round(tokens * TOP_K / EXPERTS * HIDDEN * WIDTH)}
    assert sum(per_expert.values()) == pytest.approx(tokens * TOP_K * weights)  # the block's total is exact
    assert macs["model.model.layers.0.self_attn.q_proj"] == tokens * HIDDEN * HIDDEN
    assert isinstance(m.get_submodule(block), SplitExperts)
    # an expert projection factorized into two Linears (lowrank): both count, the pair once
    rank = 4
    m.get_submodule(f"{block}.1").gate_up_proj = torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, rank, bias=False), torch.nn.Linear(rank, 2 * WIDTH, bias=False))
    macs = count_macs(m, x)
    assert f"{block}.1.gate_up_proj" not in macs
    assert macs[f"{block}.1.gate_up_proj.0"] + macs[f"{block}.1.gate_up_proj.1"] == \
        round(tokens * TOP_K / EXPERTS * HIDDEN * rank) + round(tokens * TOP_K / EXPERTS * rank * 2 * WIDTH)


def test_a_mixtral_runs_scan_plan_and_apply_with_expert_units(mixtral: Path, corpus: Path, tmp_path: Path) -> None:
    common = ["--model", f"hf:{mixtral}", "--data", f"text:{corpus}", "--task", "perplexity",
              "--seq-len", "32", "--samples", "24", "--calib-samples", "8", "--holdout-samples", "96", "--no-timing",
              "--variants", "planned"]
    out = tmp_path / "bits"
    assert main(["run", *common, "--budget", "bits=4.5", "--methods", "weight_quant", "--out", str(out)]) == 0
    scan = json.loads((out / "scan.json").read_text())
    units = {r["unit"] for r in scan["results"]}
    assert {f"model.model.layers.{i}.mlp.experts.{e}.{p}" for i in (0, 1) for e in range(EXPERTS)
            for p in ("gate_up_proj", "down_proj")} <= units
    m = json.loads((out / "result" / "metrics.json").read_text())
    bits = m["comparison"]["bits"]
    assert bits["measured"] == pytest.approx(bits["predicted"]) and bits["measured"] <= 4.5
    assert m["after"]["reload_max_abs_diff"] < 1e-4
    saved = m["save_pretrained"]
    assert saved["saved"], saved  # quantized, not pruned: the fused layout holds it
    back = transformers.AutoModelForCausalLM.from_pretrained(out / "result" / "hf")
    assert back.model.layers[0].mlp.experts.gate_up_proj.shape == (EXPERTS, 2 * WIDTH, HIDDEN)
    # a tool that names the model's modules has no module for a split expert: refused, or left out
    from sensplan._errors import UserInputError
    from sensplan.planner import Plan
    from sensplan.planner.export import export_plan

    plan = Plan.load(out / "plan.json")
    assert plan.data["model"]["split_experts"] == [f"model.model.layers.{i}.mlp.experts" for i in (0, 1)]
    with pytest.raises(UserInputError, match="MoE expert's layer exists only in sensplan's split"):
        export_plan(plan, "llm-compressor", tmp_path / "recipe.yaml")
    done = export_plan(plan, "llm-compressor", tmp_path / "recipe.yaml", drop_unsupported=True)
    assert len(done.dropped) == 2 * EXPERTS * 2
    # what the result reaches with the experts left float, from the plan's scan: not the budget
    reached = [n for n in done.notes if n.startswith(f"without the {2 * EXPERTS * 2} dropped choice(s)")]
    assert len(reached) == 1 and "bits " in reached[0] and "NOT met" in reached[0], done.notes
    recipe = [line for line in done.text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in recipe if "experts." in line]  # listed as dropped, in comments only
    assert "self_attn.q_proj" in done.text
    table = export_plan(plan, "csv", tmp_path / "plan.csv")  # sensplan's own names: every block
    assert not table.dropped and "experts.3.down_proj" in table.text
    rows = list(csv.DictReader(io.StringIO(table.text)))
    row = next(r for r in rows if r["unit"] == "model.model.layers.1.mlp.experts.3.down_proj")
    assert (row["module"], row["expert"]) == ("model.layers.1.mlp.experts.down_proj", "3")
    row = next(r for r in rows if r["unit"] == "model.model.layers.1.self_attn.q_proj")
    assert (row["module"], row["expert"]) == ("model.layers.1.self_attn.q_proj", "")

    out = tmp_path / "params"
    assert main(["run", *common, "--budget", "params=0.8", "--methods", "prune", "--ratios", "0.25,0.5",
                 "--out", str(out)]) == 0
    scan = json.loads((out / "scan.json").read_text())
    labels = {g["label"] for g in scan["groups"].values() if g["status"] == "scanned"}
    assert {f"layer {i} expert {e} MLP" for i in (0, 1) for e in range(EXPERTS)} <= labels
    m = json.loads((out / "result" / "metrics.json").read_text())
    assert m["comparison"]["params"]["measured"] == m["comparison"]["params"]["predicted"]  # exit 0: budget met
    assert m["after"]["reload_max_abs_diff"] < 1e-4
    assert m["save_pretrained"]["saved"] or m["save_pretrained"]["reason"]

    # --tie experts: each layer's experts get one width, so no expert is narrower than the rest
    tied = tmp_path / "tied.json"
    assert main(["plan", "--scan", str(out / "scan.json"), "--budget", "params=0.8", "--tie", "experts",
                 "--no-verify", "--out", str(tied)]) == 0
    plan = json.loads(tied.read_text())
    groups = plan["objective"]["tie"]["groups"]
    assert sorted(groups) == [[f"channels:model.model.layers.{i}.mlp.experts.{e}.gate_up_proj" for e in range(EXPERTS)]
                              for i in (0, 1)]
    choices = plan["plans"]["planned"]["choices"]
    for g in groups:
        assert len({json.dumps([choices[b]["method"], choices[b]["setting"]]) for b in g}) == 1
    # apply takes the model and data from the plan; the experts are written fused unless
    # transformers' kernel refuses their common width (an fp32 row of 18 is not 16-byte aligned)
    assert main(["apply", "--plan", str(tied), "--variants", "planned", "--no-timing", "--out",
                 str(tmp_path / "tied")]) == 0
    m = json.loads((tmp_path / "tied" / "metrics.json").read_text())
    assert m["save_pretrained"]["saved"] or "different widths" not in m["save_pretrained"]["reason"]
    # bits: one bit width per layer and projection for all experts
    assert main(["plan", "--scan", str(tmp_path / "bits" / "scan.json"), "--budget", "bits=4.5", "--tie", "experts",
                 "--no-verify", "--out", str(tied)]) == 0
    plan = json.loads(tied.read_text())
    assert len(plan["objective"]["tie"]["groups"]) == 4
    choices = plan["plans"]["planned"]["choices"]
    for g in plan["objective"]["tie"]["groups"]:
        assert len(g) == EXPERTS and len({json.dumps([choices[b]["method"], choices[b]["setting"]]) for b in g}) == 1
