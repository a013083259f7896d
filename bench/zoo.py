"""The model zoo: scan -> plan -> apply on every torchvision classification model and a sample of
timm models, each in its own process with a time and memory limit; writes docs/zoo.md.

    python bench/zoo.py                              # everything (hours on 2 cores), resumable
    python bench/zoo.py --models resnet18,swin_t     # some torchvision models
    python bench/zoo.py --models timm:convnext_atto  # a timm model (pip install -e ".[bench]")
    python bench/zoo.py --render                     # docs/zoo.md again from the saved records

Every model gets random weights (seeded, never downloaded), 10 classes, the smallest input of
``--px`` it accepts, ``--samples`` random images scored with the ``agreement`` task (no labels:
the compressed model against the original), and reduced settings: pruning at ``--ratios``, weight
quantization at ``--bits``. The plan asks for ``macs=0.75`` and ``size=0.3``; when that is out of
reach (few prunable groups), ``macs=0.9``, then ``size=0.3`` alone, then a size halfway between the
smallest reachable and the original. Both the planned and the uniform
allocation are applied, saved, reloaded and measured.

Per model the record (one JSON line in ``--records``) holds the status, the stage reached, the
channel groups scanned and skipped with the top reasons, predicted against measured MACs and
parameters, the wall time and the peak memory (the largest resident set of the process). Statuses:

- ``completed``: every stage ran (groups that cannot be pruned safely are skipped with a reason);
- ``clear-error``: the pipeline stopped with one sensplan error message (what is unsupported);
- ``crash``: any other exception (a bug: the record keeps the traceback);
- ``timeout`` / ``memory-limit``: the process was killed at ``--time-limit`` / ``--memory-limit``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "bench" / "zoo-results.jsonl"
MARKDOWN = ROOT / "docs" / "zoo.md"

# A sample of timm models: one per family that torchvision does not cover, small enough for 2 cores.
TIMM_SAMPLE = ("convnext_atto", "vit_tiny_patch16_224", "regnetx_002", "ghostnet_100", "rexnet_100",
               "mixnet_s", "levit_128s", "poolformer_s12", "dla34", "hrnet_w18_small", "repvgg_a0",
               "mobilevit_xxs", "edgenext_xx_small", "fastvit_t8", "lcnet_050", "resnest14d",
               "efficientvit_b0", "mobilenetv4_conv_small", "res2net50_14w_8s", "xcit_nano_12_p16_224",
               "inception_next_atto", "hgnetv2_b0", "gernet_s", "efficientformerv2_s0")
PX = (32, 64, 96, 128, 160, 224, 256, 299)
# models scanned at a larger input on purpose: swin_t at 224 px is the memory benchmark of issue 6
# vit_h_14 (632M parameters, patch 14) accepts no size of PX below 224: 28 px keeps it at 2x2 patches
PX_OVERRIDE = {"swin_t": 224, "vit_h_14": 28}
# maxvit_t takes nothing below 224 px; at 8 images its ~200 probes need more than 900 CPU s.
# regnet_y_128gf (644M parameters): its forward pass costs 0.6 s per 32-px image on one thread (linear
# in the batch), and the scan runs two per probe (recalibrate, evaluate) and two per safety check; at
# 2 images and 2 check images it ran past 900 CPU s in scan (profile of the first 500 s: 85% in the
# model's conv2d; the 87 safety checks 218 s before the first probe), so its checks run on one image
SAMPLES_OVERRIDE = {"maxvit_t": 4, "regnet_y_128gf": 2}
CHECK_SAMPLES_OVERRIDE = {"regnet_y_128gf": 1}  # otherwise min(4, samples)
WALL_FACTOR = 4  # a model waiting for CPU is still killed at this many times the time limit in wall time
BUDGETS = (("macs=0.75", "size=0.3"), ("macs=0.9",), ("size=0.3",))


# -- one model, in this process ----------------------------------------------------------------------
def synthetic(n: int, px: int, seed: int, classes: int = 10) -> Any:
    """``n`` seeded random images (no labels: the agreement task compares with the original model)."""
    import numpy as np
    import torch

    from sensplan.sensitivity import EvalSet

    x = torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(seed))
    y = torch.full((n,), -1, dtype=torch.long)
    return EvalSet(x, y, [str(i) for i in range(classes)],
                   {"spec": f"synthetic:{px}px:seed{seed}", "kind": "synthetic", "n": n, "seed": seed,
                    "input_shape": [3, px, px]}, np.arange(n))


def build(name: str, px_hint: int | None) -> tuple[Any, Any, int]:
    """The model (seeded random weights, 10 classes) and the smallest input of ``PX`` it accepts."""
    import torch

    from sensplan.sensitivity import ModelSpec, load_model

    timm = name.startswith("timm:")
    base = ({"model_name": name[5:], "pretrained": False, "num_classes": 10} if timm else {"num_classes": 10})
    source = "timm:create_model" if timm else f"torchvision:{name}"
    size_arg = "img_size" if timm else "image_size"
    errors = []
    for px in ([px_hint] if px_hint else list(PX)):
        for extra in ({}, {size_arg: px}):
            if extra and not timm and not name.startswith("vit_"):
                continue
            spec = ModelSpec(source, {**base, **extra})
            try:
                model = load_model(spec)
                with torch.no_grad():
                    out = model(torch.zeros(1, 3, px, px))
                if isinstance(out, torch.Tensor) and out.shape == (1, 10):
                    return spec, model, px
                errors.append(f"{px}px: output {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
            except Exception as e:  # the input is too small for this model: try the next size
                errors.append(f"{px}px{' ' + str(extra) if extra else ''}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''}")
    raise RuntimeError("no input size works: " + " | ".join(errors[-3:]))


def reason_kind(reason: str) -> str:
    """A skip reason without its numbers and names, to count reasons across groups."""
    r = reason
    if "output shape" in r:
        return "produces the model's outputs (the classifier)"
    if "cannot map this group" in r:
        return ("Torch-Pruning's index mapping runs away through reshapes" if "collects more than" in r
                or "grows past" in r else "Torch-Pruning's dependency walk does not close")
    if "out of proportion" in r:
        return "removes elements out of proportion to its channels (a slice of them)"
    if "equal chunks" in r:
        return "grouped-conv chunks too small to lose a channel"
    if r.startswith("only "):
        return "too few channels"
    head = ("pruning breaks the model" if "breaks the model" in r else
            "Torch-Pruning cannot rank the channels" if "cannot rank" in r else
            "probe fails" if "probe of this group fails" in r else
            "probe differs from real pruning" if "does not reproduce" in r else r[:60])
    cause = r.split("Likely cause: ", 1)[1] if "Likely cause: " in r else ""
    cause = re.sub(r"'[\w.\-]+'( \((groups=\d+|\d+ groups)\))?", "…", cause.split(". ")[0]).rstrip(".")
    return f"{head}: {cause}" if cause else head


def run_model(name: str, *, px: int | None = None, samples: int = 8, ratios: tuple[float, ...] = (0.5,),
              bits: tuple[int, ...] = (4,), variants: tuple[str, ...] = ("planned", "uniform"),
              plan_time_limit: float = 20.0, record: dict[str, Any] | None = None,
              save: Any = None, check_samples: int | None = None) -> dict[str, Any]:
    """scan -> plan -> apply one model in this process; return (and keep updating) its record."""
    from sensplan._errors import InfeasibleBudgetError, SensplanError
    from sensplan.planner import Budget, Costs, apply_plan, make_plan, min_cost
    from sensplan.sensitivity import ScanConfig, scan

    rec: dict[str, Any] = record if record is not None else {}
    rec.update(model=name, status="running", stage="build", seconds={})
    save = save or (lambda r: None)
    t_all = time.perf_counter()

    def stage(what: str) -> None:
        rec["stage"] = what
        rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        save(rec)

    try:
        t = time.perf_counter()
        spec, model, used_px = build(name, px)
        rec.update(px=used_px, spec=spec.to_dict(),
                   params=int(sum(p.numel() for p in model.parameters())))
        rec["seconds"]["build"] = round(time.perf_counter() - t, 1)
        stage("scan")
        t = time.perf_counter()
        data, calib = synthetic(samples, used_px, 0), synthetic(samples, used_px, 1)
        cfg = ScanConfig({"prune": [{"ratio": r} for r in ratios], "weight_quant": [{"bits": b} for b in bits]},
                         task="agreement", batch_size=max(1, samples),
                         check_samples=check_samples or min(4, samples))
        table = scan(model, data, cfg, calib=calib, model_spec=spec, progress=False)
        groups = table.groups
        skipped = {g: v["reason"] for g, v in groups.items() if v["status"] == "skipped"}
        rec.update(layers=len(table.layers), groups=len(groups), groups_scanned=len(groups) - len(skipped),
                   probes=len(table.results),
                   pruning_unavailable=table.data["pruning_graph"]["reason"] or None,
                   skip_reasons=Counter(reason_kind(r) for r in skipped.values()).most_common(),
                   skip_example=next(iter(sorted(skipped.values(), key=lambda r: "output shape" in r)), None))
        rec["seconds"]["scan"] = round(time.perf_counter() - t, 1)
        stage("plan")
        t = time.perf_counter()
        plan = None
        for budgets in BUDGETS:
            try:
                plan = make_plan(table, [Budget.parse(b) for b in budgets], time_limit=plan_time_limit)
                rec["budgets"] = list(budgets)
                break
            except InfeasibleBudgetError as e:
                rec["infeasible"] = str(e).splitlines()[0][:200]
        if plan is None:  # halfway between the smallest reachable size and the original
            cm = Costs(table)
            least = min_cost(cm, "size").costs["size"] / cm.original["size"]
            budgets = (f"size={least + (1 - least) / 2:.3f}",)
            plan = make_plan(table, [Budget.parse(b) for b in budgets], time_limit=plan_time_limit)
            rec["budgets"] = list(budgets)
        rec["seconds"]["plan"] = round(time.perf_counter() - t, 1)
        rec["apply"] = {}
        for variant in variants:
            if plan.data["plans"].get(variant) is None:
                rec["apply"][variant] = None
                continue
            stage(f"apply {variant}")
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                m = apply_plan(model, plan, data, out, variant=variant, calib=calib, model_spec=spec,
                               timing=False)
            comp = m.get("comparison", {})
            rec["apply"][variant] = {
                k: {"predicted": comp[k]["predicted"], "measured": comp[k]["measured"]}
                for k in ("macs", "params", "size") if k in comp}
            rec["apply"][variant].update(
                macs_fraction=m["after"]["macs"] / max(1, m["before"]["macs"]),
                reload_max_abs_diff=m["after"].get("reload_max_abs_diff"),
                drop_predicted=m["predicted"].get("drop"),
                drop_measured=comp.get("drop_without_finetune", {}).get("measured"),
                budgets_met=all(b.get("met") is not False for b in m.get("budgets", [])))
            rec["seconds"][f"apply {variant}"] = round(time.perf_counter() - t, 1)
        rec["status"] = "completed"
    except SensplanError as e:
        rec.update(status="clear-error", error=f"{type(e).__name__}: {e}")
    except Exception as e:
        rec.update(status="crash", error=f"{type(e).__name__}: {str(e)[:500]}",
                   traceback=traceback.format_exc()[-3000:])
    rec["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    save(rec)
    return rec


# -- many models, each in a subprocess -------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads), from /proc; 0 where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_isolated(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``run_model`` in a child process, killed at the time or memory limit.

    The time limit counts the child's CPU time (all its threads), not wall time: on a machine shared
    with other work a model is not killed for waiting its turn. Both are recorded."""
    samples = SAMPLES_OVERRIDE.get(name, args.samples)
    checks = CHECK_SAMPLES_OVERRIDE.get(name, min(4, samples))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--record", str(out),
               "--samples", str(samples), "--check-samples", str(checks), "--ratios", args.ratios,
               "--bits", args.bits,
               "--variants", args.variants, "--threads", str(args.threads)]
        if name in PX_OVERRIDE:
            cmd += ["--px", str(PX_OVERRIDE[name])]
        t0, peak, killed, cpu, limit = time.perf_counter(), 0, "", 0.0, "memory limit"
        with open(Path(tmp) / "log.txt", "w") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            while p.poll() is None:
                rss = _rss(p.pid)
                peak = max(peak, rss)
                cpu = max(cpu, _cpu_seconds(p.pid))
                wall = time.perf_counter() - t0
                if rss > args.memory_limit * 2**30:
                    killed = "memory-limit"
                elif cpu > args.time_limit * max(1, args.threads):
                    killed, limit = "timeout", f"CPU-time limit ({cpu:.0f} CPU s)"
                elif wall > WALL_FACTOR * args.time_limit:
                    killed, limit = "timeout", (f"wall-time cap ({WALL_FACTOR}x the time limit; it had used "
                                                f"{cpu:.0f} CPU s in {wall:.0f} s of wall time)")
                if killed:
                    p.kill()
                    p.wait()
                    break
                time.sleep(0.25)
        log_tail = (Path(tmp) / "log.txt").read_text(errors="replace")[-1500:]
        rec: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"model": name, "stage": "start"}
    rec["peak_rss_mb"] = max(int(rec.get("peak_rss_mb", 0)), round(peak / 2**20))
    rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
    rec["cpu_seconds"] = round(cpu, 1)
    rec["samples"], rec["check_samples"] = samples, checks
    if killed:
        rec.update(status=killed, error=f"killed at the {limit} during {rec.get('stage')}")
    elif rec.get("status") in (None, "running"):
        rec.update(status="crash", error=f"the process exited with {p.returncode}", log=log_tail)
    return rec


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["model"]] = r
    return out


def by_size(names: list[str]) -> list[str]:
    """``names``, smallest parameter count first (built on the meta device: no memory, no init)."""
    import torch

    from sensplan.sensitivity import ModelSpec, build_model

    def size(name: str) -> float:
        spec = (ModelSpec("timm:create_model", {"model_name": name[5:], "pretrained": False})
                if name.startswith("timm:") else ModelSpec(f"torchvision:{name}"))
        try:
            with torch.device("meta"):
                return float(sum(p.numel() for p in build_model(spec).parameters()))
        except Exception:  # RegNet's init needs real tensors: build the small ones for real
            if re.search(r"(400|800)mf|_1_6gf|_3_2gf|_8gf", name):
                return float(sum(p.numel() for p in build_model(spec).parameters()))
            return float("inf")

    return sorted(names, key=size)


def all_models(timm_sample: tuple[str, ...]) -> list[str]:
    import torchvision

    names = list(torchvision.models.list_models(module=torchvision.models))
    return names + [f"timm:{n}" for n in timm_sample]


# -- docs/zoo.md -----------------------------------------------------------------------------------------
def _ratio(entry: dict[str, Any] | None) -> str:
    if not entry or not entry.get("predicted"):
        return "–"
    p, m = entry["predicted"], entry["measured"]
    return f"{m / p:.3f}" if p else "–"


def _short(kind: str, n: int = 140) -> str:
    # records written before reason_kind kept the apostrophe of "group's" as a quote
    kind = re.sub(r"group…[\w.\-]+' \((groups=\d+|\d+ groups)\)\)", "group's channels (…)", kind)
    kind = kind.replace("its channels pass through operations Torch-Pruning does not map channel by channel",
                        "ops Torch-Pruning does not map per channel")
    return kind if len(kind) <= n else kind[: n - 1].rstrip() + "…"


def render(records: dict[str, dict[str, Any]], names: list[str], settings: str, note: str = "") -> str:
    counts = Counter(r.get("status", "not run") for r in records.values() if r["model"] in names)
    done = [n for n in names if n in records]
    with_skips = sum(1 for n in done if records[n].get("status") == "completed"
                     and (records[n].get("groups", 0) - records[n].get("groups_scanned", 0) > 1
                          or records[n].get("pruning_unavailable")))
    tv = [n for n in names if not n.startswith("timm:")]
    lines = [
        "# Which models work: the model zoo",
        "",
        "Generated by `python bench/zoo.py` (see its docstring); do not edit by hand. Every model is taken",
        "through scan → plan → apply with random weights (seeded, never downloaded), in its own process.",
        "",
        f"**Settings:** {settings}",
        "",
        *([note, ""] if note else []),
        f"**Run:** {len(done)} of {len(names)} models ({sum(n in records for n in tv)} of the {len(tv)} "
        f"torchvision classification models, {sum(n in records for n in names if n.startswith('timm:'))} "
        "timm models).",
        "",
        "| status | models |",
        "|---|---|",
        *(f"| {s} | {counts.get(s, 0)} |" for s in ("completed", "clear-error", "crash", "timeout",
                                                    "memory-limit")),
        f"| not run | {len(names) - len(done)} |",
        "",
        f"Of the completed models, {with_skips} skip channel groups beyond the classifier (or have no "
        "pruning at all); each skip has its reason in the scan and the report.",
        "",
        "\"ops Torch-Pruning does not map per channel\" lists operations in the group that Torch-Pruning "
        "treats as element-wise or maps index by index although they move channels (reshape, permute, "
        "slice, padding, attention products).",
        "",
        "Columns: *groups* = channel groups scanned / found (the classifier's group is always skipped: "
        "it produces the outputs); *MACs* and *params* = measured / predicted after applying the planned "
        "allocation (1.000 = exact); *peak* = the largest resident memory of the process.",
        "",
        "| model | px | params | status | stage | groups | top skip reasons | MACs m/p | params m/p | "
        "time s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = records.get(n)
        if r is None:
            lines.append(f"| {n} | | | not run | | | | | | | |")
            continue
        reasons = "; ".join(f"{_short(k)} ({c})" for k, c in (r.get("skip_reasons") or [])[:3])
        if r.get("pruning_unavailable"):
            reasons = "pruning unavailable: " + r["pruning_unavailable"].split(" (")[0].rstrip(".")
        planned = (r.get("apply") or {}).get("planned") or {}
        groups = f"{r['groups_scanned']}/{r['groups']}" if "groups" in r else ""
        params = f"{r['params'] / 1e6:.1f}M" if "params" in r else ""
        stage = "" if r.get("status") == "completed" else r.get("stage", "")
        seconds = r.get("wall_seconds", r.get("seconds", {}).get("total", ""))
        lines.append(f"| {n} | {r.get('px', '')} | {params} | {r.get('status')} | {stage} | {groups} | "
                     f"{reasons.replace('|', '/')} | {_ratio(planned.get('macs'))} | "
                     f"{_ratio(planned.get('params'))} | {seconds} | {r.get('peak_rss_mb', '')} |")
    problems = [records[n] for n in names if n in records and records[n].get("status") != "completed"]
    if problems:
        lines += ["", "## Models that did not complete", ""]
        for r in problems:
            lines.append(f"- **{r['model']}** ({r.get('status')}, at {r.get('stage')}): "
                         f"{str(r.get('error', '')).splitlines()[0][:400]}")
    examples = [(n, records[n]) for n in names if n in records and records[n].get("skip_example")]
    if examples:
        lines += ["", "## One skip reason per model, in full", ""]
        for n, r in examples:
            lines.append(f"- **{n}**: {r['skip_example']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated names (torchvision, or timm:NAME); default: all")
    ap.add_argument("--timm", default=",".join(TIMM_SAMPLE), help="timm models in the default set ('' = none)")
    ap.add_argument("--samples", type=int, default=8, help="random images to evaluate on (and as many to calibrate)")
    ap.add_argument("--ratios", default="0.5", help="pruning ratios scanned")
    ap.add_argument("--bits", default="4", help="weight bits scanned")
    ap.add_argument("--variants", default="planned,uniform")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model")
    ap.add_argument("--jobs", type=int, default=1, help="models run at the same time")
    ap.add_argument("--time-limit", type=float, default=900.0,
                    help="CPU seconds per model and thread (wall time on an idle machine)")
    ap.add_argument("--memory-limit", type=float, default=12.0, help="GiB of resident memory per model")
    ap.add_argument("--records", default=str(RECORDS), help="JSON lines, one per model (resumable)")
    ap.add_argument("--out", default=str(MARKDOWN), help="the Markdown table")
    ap.add_argument("--rerun", action="store_true", help="run models that already have a record again")
    ap.add_argument("--render", action="store_true", help="only write --out from --records")
    ap.add_argument("--note", default="", help="a paragraph for --out (e.g. which models were run again)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--px", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--check-samples", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ratios = tuple(float(r) for r in args.ratios.split(",") if r)
    bits = tuple(int(b) for b in args.bits.split(",") if b)
    variants = tuple(v for v in args.variants.split(",") if v)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        path = Path(args.record)

        def save(rec: dict[str, Any]) -> None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, path)

        run_model(args.worker, px=args.px, samples=args.samples, ratios=ratios, bits=bits,
                  variants=variants, save=save, check_samples=args.check_samples)
        return 0

    timm_sample = tuple(n for n in args.timm.split(",") if n)
    names = [m.strip() for m in args.models.split(",")] if args.models else all_models(timm_sample)
    records_path = Path(args.records)
    records = load_records(records_path)
    settings = (f"{args.samples} random images at the smallest of {list(PX)} px the model accepts "
                f"({', '.join(f'{k}: {v} px' for k, v in PX_OVERRIDE.items())}; "
                f"{', '.join(f'{k}: {v} images' for k, v in SAMPLES_OVERRIDE.items())}), the safety "
                f"checks on min(4, images) of them ("
                f"{', '.join(f'{k}: {v}' for k, v in CHECK_SAMPLES_OVERRIDE.items())}), 10 classes, "
                f"task `agreement`; "
                f"prune ratios {list(ratios)}, weight bits "
                f"{list(bits)}; budgets {' / then '.join(' + '.join(b) for b in BUDGETS)} / then a size halfway "
                f"between the smallest reachable and the original; variants "
                f"{', '.join(variants)}; {args.threads} torch thread(s); limits {args.time_limit:.0f} CPU s per thread "
                f"(and {WALL_FACTOR}x that in wall time) "
                f"and {args.memory_limit:g} GiB per model.")
    if not args.render:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        todo = by_size([n for n in names if args.rerun or n not in records])
        lock = threading.Lock()

        def one(name: str) -> None:
            rec = run_isolated(name, args)
            with lock:
                records[name] = rec
                with open(records_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                planned = (rec.get("apply") or {}).get("planned") or {}
                print(f"[{len(records)}] {name}: {rec['status']} ({rec.get('stage')}), groups "
                      f"{rec.get('groups_scanned', '-')}/{rec.get('groups', '-')}, MACs m/p "
                      f"{_ratio(planned.get('macs'))}, {rec['wall_seconds']} s, {rec['peak_rss_mb']} MB "
                      f"{rec.get('error', '')[:150]}", flush=True)
                Path(args.out).write_text(render(records, names, settings))

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(one, todo))
    full = all_models(timm_sample)
    Path(args.out).write_text(render(records, full if set(names) <= set(full) else names, settings, args.note))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
