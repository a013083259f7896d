"""``sensplan apply``: apply a plan to a copy of the model, fine-tune (optional), measure, save."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sensplan._errors import UserInputError
from sensplan.cli._common import (
    EXIT_BUDGET_MISSED,
    Output,
    Problems,
    add_data_args,
    add_model_args,
    add_runtime_args,
    add_verb,
    check_data_args,
    check_outputs,
    check_runtime_args,
    data_spec,
    device,
    flag_given,
    load_data,
    load_model,
    need,
    say,
    set_threads,
)

if TYPE_CHECKING:
    from sensplan.cli._common import SubParsers
    from sensplan.planner import FineTuneConfig, Plan
    from sensplan.sensitivity import EvalSet, ModelSpec

EXAMPLE = """\
  sensplan apply --plan plan.json --out result/      # the model and data the plan records
  sensplan apply --model examples/cifar_resnet.py:resnet20 \\
      --weights ../shared/models/cifar10/resnet20_jpeg.pt --plan plan.json \\
      --data ../shared/data/cifar10-jpg/test --out result/
  sensplan apply ... --train-data ../shared/data/cifar10-jpg/train --epochs 2 --out result/
"""

#: fine-tuning flags (dest, default): given without --train-data they would do nothing
FINETUNE_DEFAULTS = {"epochs": 1, "train_samples": None, "lr": 0.01, "temperature": 4.0,
                     "alpha": 0.7, "max_steps": None, "augment": False}
#: the files apply writes into each variant's directory
FILES = ("model.sensplan", "metrics.json", "plan.json")


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "apply", "Apply a plan: prune structurally, fine-tune (optional), quantize, "
                               "measure, save.", EXAMPLE)
    add_model_args(p, recorded="the plan's")
    p.add_argument("--plan", required=True, metavar="FILE", help="plan.json from `sensplan plan`")
    add_data_args(p, recorded="the data the plan's scan measured")
    add_apply_args(p)
    add_runtime_args(p, dtype=False)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: model.sensplan, metrics.json, plan.json (the uniform "
                        "allocation's in DIR/uniform/)")
    p.set_defaults(fn=main)


def add_apply_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (knowledge distillation from the original model)")
    g.add_argument("--train-data", metavar="SPEC",
                   help="training data; fine-tuning runs only when given")
    g.add_argument("--epochs", type=int, metavar="N", help="fine-tuning epochs (default 1)")
    g.add_argument("--train-samples", type=int, metavar="N",
                   help="use a stratified sample of N training items (default all)")
    g.add_argument("--lr", type=float, help="initial learning rate, cosine decay (default 0.01)")
    g.add_argument("--temperature", type=float, help="distillation temperature T (default 4)")
    g.add_argument("--alpha", type=float, help="weight of the soft-target loss (default 0.7)")
    g.add_argument("--max-steps", type=int, metavar="N",
                   help="stop fine-tuning after N optimizer steps")
    g.add_argument("--augment", action="store_true", default=None,
                   help="random crop (1/8 padding) and horizontal flip")
    o = p.add_argument_group("execution")
    o.add_argument("--variants", default="planned,uniform", metavar="LIST",
                   help="which allocations of the plan to apply and measure (default "
                        "planned,uniform)")
    o.add_argument("--no-timing", action="store_true", help="skip the latency measurement")
    o.add_argument("--runtime", default="torch", metavar="NAME",
                   help="torch | onnxruntime: also export model.onnx (pruned shapes; the plan's int8 "
                        "layers as QDQ nodes) and measure its score, latency, memory and file size on "
                        "ONNX Runtime against the original (needs the ort extra) (default torch)")
    o.add_argument("--latency-batch", type=int, metavar="B",
                   help="latency is timed at batch 1 and at batch B, original and compressed "
                        "interleaved (default: the batch of the plan's latency table from sensplan "
                        "profile, else 32)")


# -- checks --------------------------------------------------------------------------------------
def check_variants(args: argparse.Namespace, problems: Problems) -> list[str]:
    from sensplan.planner._plan import VARIANTS

    vs = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    if not vs or any(v not in VARIANTS for v in vs):
        problems.add(f"--variants takes a comma-separated subset of {', '.join(VARIANTS)}. "
                     f"Got {args.variants!r}.")
        return []
    return vs


def check_finetune(args: argparse.Namespace, problems: Problems) -> FineTuneConfig | None:
    """The fine-tuning configuration (None without --train-data)."""
    from sensplan.planner import FineTuneConfig

    given = [k for k in FINETUNE_DEFAULTS if getattr(args, k) is not None]
    if not args.train_data:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            verb, them = ("matters", "it") if len(given) == 1 else ("matter", "them")
            problems.add(f"{flags} only {verb} when fine-tuning. Add --train-data SPEC, or drop {them}.")
        return None
    for k, default in FINETUNE_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    before = len(problems.messages)
    problems.at_least(args.epochs, 0, "--epochs")
    problems.at_least(args.train_samples, 1, "--train-samples")
    problems.at_least(args.lr, 0, "--lr", strict=True)
    problems.at_least(args.temperature, 0, "--temperature", strict=True)
    problems.at_least(args.max_steps, 1, "--max-steps")
    if not 0.0 <= args.alpha <= 1.0:
        problems.add(f"--alpha must be in the range [0, 1]. Got {args.alpha:g}.")
    train = problems.check(partial(data_spec, args.train_data, args, "--train-data"))
    try:  # a bad --data is reported by its own check
        evaluated = data_spec(args.data, args, "--data") if args.data else None
    except UserInputError:
        evaluated = None
    if train is not None and train.is_text and not train.label_field:
        problems.add(f"--train-data {args.train_data}: fine-tuning distils a classifier on labelled data; "
                     f"it does not fine-tune a language model or an embedding model. Drop --train-data, or "
                     f"give labelled records (jsonl:FILE:TEXT:LABEL or datasets:DIR:TEXT:LABEL) for a "
                     f"sequence classifier.")
    if train is not None and evaluated is not None and train.same_source(evaluated):
        problems.add(f"--train-data {args.train_data} is the data the model is measured on (--data {args.data}): "
                     f"distillation would train on the images it is then scored on, and the measured drop "
                     f"would flatter the plan. Pass a training split (e.g. digits:train, or the train/ "
                     f"folder beside test/).")
    if len(problems.messages) > before:
        return None
    return problems.check(partial(FineTuneConfig, epochs=args.epochs, lr=args.lr,
                                  temperature=args.temperature, alpha=args.alpha,
                                  max_steps=args.max_steps, seed=args.seed))


def result_outputs(out: Path, variants: list[str], flag: str = "--out", runtime: str = "torch") -> list[Output]:
    outs = [Output(out, flag, is_dir=True)]
    files = (*FILES, "model.onnx") if runtime == "onnxruntime" else FILES
    for v in variants:
        d = out if v == "planned" else out / v
        outs += [Output(d, flag, is_dir=True), *(Output(d / f, flag) for f in files)]
    return outs


def check(args: argparse.Namespace, problems: Problems
          ) -> tuple[list[str], FineTuneConfig | None]:
    """Every check of apply's flags that needs no model, no data and no plan."""
    check_data_args(args, problems)
    check_runtime_args(args, problems)
    check_execution(args, problems)
    return check_variants(args, problems), check_finetune(args, problems)


def check_execution(args: argparse.Namespace, problems: Problems) -> None:
    """--runtime and --latency-batch."""
    from sensplan.planner import check_runtime

    problems.check(partial(check_runtime, args.runtime))
    problems.at_least(args.latency_batch, 1, "--latency-batch")
    if args.runtime == "onnxruntime" and args.device != "cpu":
        problems.add(f"--runtime onnxruntime measures on ONNX Runtime's CPU kernels; the torch side would run "
                     f"on --device {args.device}. Use --device cpu with it, or --runtime torch.")


# -- running -------------------------------------------------------------------------------------
def train_loader(args: argparse.Namespace, ft: FineTuneConfig | None) -> Any:
    """The fine-tuning data loader (opening the data set checks it); None without --train-data."""
    from sensplan.sensitivity import train_loader as _loader

    if ft is None:
        return None
    return _loader(data_spec(args.train_data, args, "--train-data"), ft.batch_size, args.seed,
                   augment=bool(args.augment), n=args.train_samples)


def measurement_data(args: argparse.Namespace, plan: Plan, data: EvalSet, calib: EvalSet | None
                     ) -> tuple[EvalSet, EvalSet | None, str]:
    """The data apply measures on, the calibration it recalibrates with, and what the former is.

    Measured on the images the plan was chosen on, a plan looks better than it is. So when --data
    is the scan's data: the report half of the held-out split that verification set aside (no
    choice touched it), or else the items outside the scan's sample and calibration; BatchNorm is
    recalibrated on the scan's own calibration set. Only when nothing is left outside the sample
    are the numbers in-sample, and metrics.json says so."""
    from sensplan.planner import scan_sample, split_held
    from sensplan.sensitivity import DataSpec, load_eval_set

    rec = (plan.data.get("scan") or {}).get("sample")
    if not rec or not rec.get("kind") or not rec.get("indices_sha256"):
        return data, calib, "--data as given (the plan does not record which images its scan used)"
    recorded = DataSpec.from_record(dict(rec))
    # the user's labels and preprocessing (checked later), else the scan's as recorded
    given = data_spec(args.data, args, "--data") if args.data else recorded
    named = f"--data {args.data}" if args.data else f"the scan's data {rec.get('spec')!r}"
    if not given.same_source(recorded):
        return data, calib, f"{named}: other data than the scan's sample (out of sample)"
    if given.kind == "text" and (given.tokenizer, given.seq_len) != (recorded.tokenizer, recorded.seq_len):
        # the scan's split is of its own windows: items of other windows would overlap its sample
        say(f"note: {named} is the scan's text, cut into its windows ({recorded.seq_len} tokens) to measure outside "
            f"its sample (--seq-len {given.seq_len} would overlap it)")
        given = dataclasses.replace(given, tokenizer=recorded.tokenizer, seq_len=recorded.seq_len)
    hint = " Pass the --data the scan used, unchanged." if args.data else " Run apply where the scan's data is."
    sample, scan_calib, exclude, _ = scan_sample(rec, (plan.data.get("scan") or {}).get("calibration"), hint)
    calib = scan_calib if calib is not None else None  # --no-bn-recalibration still turns it off
    what = "--data" if args.data else "the scan's data"
    draw = (plan.data.get("verification") or {}).get("held_out_draw")
    try:
        if draw:
            held = load_eval_set(given, draw["n"], int(draw["seed"]), exclude=exclude)
            _, report = split_held(held, int(draw["split_seed"]), [])
            if report is not None:
                if flag_given(args, "--samples"):
                    say(f"note: --samples {args.samples} is not used: apply measures on the report half of the "
                        f"plan's held-out split ({len(report)} items), where its verdict was measured")
                return report, calib, (f"the report half of the held-out split ({len(report)} items of {what} outside "
                                       f"the scan's sample and calibration that no choice of the plan touched)")
        held = load_eval_set(given, args.samples or None, int(rec.get("seed", 0)) + 2, exclude=exclude)
        return held, calib, f"{len(held)} items of {what} outside the scan's sample and calibration (out of sample)"
    except UserInputError:
        say(f"note: {named} has no items outside the scan's sample and calibration: the measured "
            f"numbers are in-sample (the plan was chosen on these images, so they flatter it)")
        return sample, calib, f"the scan's sample (in-sample: the plan was chosen on it; {what} has nothing else)"


def execute(args: argparse.Namespace, plan: Plan, variants: list[str], model: Any,
            spec: ModelSpec, data: EvalSet, calib: EvalSet | None, loader: Any,
            ft: FineTuneConfig | None, out: Path) -> list[str]:
    """Apply and measure each variant (out of sample, see :func:`measurement_data`); return the
    budgets missed (one line each)."""
    from sensplan.planner import apply_plan, measure_original, missed_budgets
    from sensplan.planner._apply import check_compatible
    from sensplan.sensitivity import check_classes_fit, check_model_and_data, get_task

    data, calib, measured_on = measurement_data(args, plan, data, calib)
    dev = device(args.device)
    model = model.to(dev)
    data = data.to(dev)
    calib = calib.to(dev) if calib is not None else None
    task = get_task(plan.data["task"]["name"], named_in="The plan")
    outputs = check_model_and_data(model, data, task, dev)
    if loader is not None and outputs is not None:  # the fine-tuning loss uses its labels
        check_classes_fit(loader.classes, loader.spec, outputs, "--train-data")
    check_compatible(model, plan, data.example_input)
    have = [v for v in variants if plan.data["plans"].get(v) is not None]
    for v in variants:
        if v not in have:
            say(f"the plan has no {v} allocation (none meets the budget); skipping it")
    state = task.prepare(model, data)
    from sensplan.planner import latency_table

    table = latency_table(plan)
    batch = args.latency_batch or int((table or {}).get("measured", {}).get("batch") or 32)
    if table and not args.no_timing:
        m = table["measured"]
        if m.get("runtime") != args.runtime or int(m.get("batch") or 0) != batch:
            say(f"note: the plan's latency table was measured on {m.get('runtime')} at batch {m.get('batch')}; "
                f"apply times --runtime {args.runtime} at batch {batch}, so its predicted latency is not "
                f"compared (pass --runtime {m.get('runtime')} --latency-batch {m.get('batch')})")
        if args.device != "cpu" and m.get("runtime") == "torch":
            say(f"note: the plan's latency table was measured on the CPU; --device {args.device} times elsewhere")
    say(f"measuring on {measured_on}")
    say("measuring the original model")
    before = measure_original(model, data, spec, timing=False, task=task, task_state=state)
    missed: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    original_onnx = out / f".original.onnx.{os.getpid()}.partial"
    on_runtime = None
    try:
        if args.runtime == "onnxruntime":  # the original's export and measurements serve every variant
            import torch

            from sensplan.planner import export_onnx, ort_measurements

            say("exporting the original model to ONNX and measuring it on ONNX Runtime")
            export_onnx(model, data.example_input, original_onnx)
            on_runtime = ort_measurements(model, original_onnx, data, task, state,
                                          threads=torch.get_num_threads(), batch=batch)
        for v in have:
            say(f"applying the {v} allocation")
            m = apply_plan(model, plan, data, out if v == "planned" else out / v, variant=v,
                           calib=calib, train_loader=loader, finetune=ft, model_spec=spec,
                           timing=not args.no_timing, before=before, measured_on=measured_on,
                           runtime=args.runtime, latency_batch=batch,
                           original_onnx=original_onnx if args.runtime == "onnxruntime" else None,
                           original_on_runtime=on_runtime)
            print_metrics(v, task.metric.name, m)
            missed += [f"{v}: {line}" for line in missed_budgets(m)]
    finally:
        original_onnx.unlink(missing_ok=True)
    if loader is not None and getattr(loader, "skipped", None):
        bad = {b.path: b.reason for b in loader.skipped}  # each epoch and variant meets them again
        examples = "; ".join(f"{path}: {why}" for path, why in list(bad.items())[:3])
        say(f"--skip-bad-images: left out {len(bad)} unreadable image(s) of --train-data during "
            f"fine-tuning, e.g. {examples}")
    return missed


def print_metrics(variant: str, metric: str, m: dict[str, Any]) -> None:
    b, a = m["before"], m["after"]
    lat = ""
    for batch, t in ((m.get("timing") or {}).get("batches") or {}).items():
        lat += (f", latency p50 {t['original']['p50_ms']:.2f} -> {t['compressed']['p50_ms']:.2f} ms at batch "
                f"{batch}")
    met = ", ".join(f"{x['metric']} {_met(x['met'])}" for x in m["budgets"])
    say(f"  {variant}: {metric} {b['score']:.4f} -> {a['score']:.4f}, size "
        f"{b['payload_bytes'] / 1e6:.3f} -> {a['payload_bytes'] / 1e6:.3f} MB, MACs "
        f"{b['macs'] / 1e6:.2f} -> {a['macs'] / 1e6:.2f} M{lat}"
        + (f"; budget {met}" if met else ""))
    drop = (m.get("comparison") or {}).get("drop_without_finetune") or {}
    if isinstance(drop.get("predicted"), (int, float)) and isinstance(drop.get("measured"), (int, float)):
        say(f"    {metric} drop: predicted {drop['predicted']:.4f}, measured {drop['measured']:.4f}"
            + (" (before fine-tuning)" if m.get("fine_tune") else ""))
    worst = (m.get("per_class") or [])[:3]
    if len(m.get("per_class") or []) > 1:
        say("    worst classes: " + ", ".join(f"{r['class']} {r['before']:.3f} -> {r['after']:.3f}" for r in worst))
    for name, c in (m.get("comparison") or {}).items():
        if "original_measured" in c and None not in (c["error"], c["fraction_predicted"], c["fraction_measured"]):
            say(f"    {name} by the latency table: predicted {c['predicted']:.3f} ms, measured {c['measured']:.3f} ms "
                f"({c['error']:+.1%}); as a fraction of the original: predicted {c['fraction_predicted']:.3f}, "
                f"measured {c['fraction_measured']:.3f}")
    timing = m.get("timing") or {}
    if timing.get("warning"):
        say(f"    warning: the latency figures are unreliable: {timing['warning']}")
    rt = m.get("runtime")
    if rt:
        ort_b, ort_a = rt["original"], rt["compressed"]
        speed = ", ".join(f"{k} {v:.2f}x" for k, v in (rt.get("speedup") or {}).items())
        say(f"    on ONNX Runtime {rt['version']} ({rt['threads']} thread(s)): {metric} {ort_b['score']:.4f} -> "
            f"{ort_a['score']:.4f}, model.onnx {ort_b['file_bytes'] / 1e6:.3f} -> {ort_a['file_bytes'] / 1e6:.3f} MB"
            + (f", speed-up {speed}" if speed else "")
            + f"; {rt['quantized']['int8_nodes']} int8 layer(s)"
            + (f", {rt['quantized']['nbits_nodes']} MatMulNBits layer(s)"
               if rt["quantized"].get("nbits_nodes") else ""))
        for layer, why in list(rt["quantized"]["float_layers"].items())[:5]:
            say(f"      {layer}: {why}")
        if (rt.get("latency") or {}).get("warning"):
            say(f"    warning: the ONNX Runtime latency figures are unreliable: {rt['latency']['warning']}")
    hf = m.get("save_pretrained")
    if hf:
        say(f"    save_pretrained folder: {hf['path']} (loads with from_pretrained; {hf.get('note', '')})"
            if hf.get("saved") else f"    no save_pretrained folder: {hf.get('reason')}; load model.sensplan "
                                    f"with sensplan's load_compressed")


def _met(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "MISSED"


def report_missed(command: str, missed: list[str], variants: Sequence[str] = ("planned",)) -> int:
    """Say which budgets the measured models missed; the exit code: EXIT_BUDGET_MISSED when the
    planned allocation missed one (the uniform one beside it, a comparison, only gets a note), or,
    where ``variants`` leave the planned one out, any of them."""
    judged = ("planned: ",) if "planned" in variants else tuple(f"{v}: " for v in variants)
    planned = [line for line in missed if line.startswith(judged)]
    others = [line for line in missed if not line.startswith(judged)]
    if others:
        say("note: measured over its budget (a comparison, not the plan): " + "; ".join(others))
    if not planned:
        return 0
    say(f"sensplan {command}: budget missed: " + "; ".join(planned)
        + ". The files are written (see metrics.json). Where the prediction was off (compare predicted and "
          "measured above), rebuild what predicted it (e.g. sensplan profile on an idle machine); else plan "
          "again with a tighter budget.")
    return EXIT_BUDGET_MISSED


def table_threads(args: argparse.Namespace, plan: Plan) -> None:
    """Time on the thread count the plan's latency table was measured with, unless --threads says
    otherwise (then say that the prediction was for another count)."""
    from sensplan.planner import latency_table

    table = latency_table(plan)
    threads = ((table or {}).get("measured") or {}).get("threads")
    if not threads or args.no_timing:
        return
    if args.threads is None:
        args.threads = int(threads)
        say(f"timing on {threads} thread(s), as the plan's latency table was measured (pass --threads N for "
            f"another count)")
    elif args.threads != threads:
        say(f"note: the plan's latency table was measured on {threads} thread(s); --threads {args.threads} "
            f"times on another count, so the predicted latency may not hold")


#: the data flags that shape --data (refused without it: the plan's data is taken as recorded)
DATA_FLAGS = ("class_map", "resize", "crop", "mean", "std", "tokenizer", "seq_len", "skip_bad_images",
              "calib_data")
#: the data flags with a default, refused without --data only when given (--seed also seeds
#: fine-tuning; --samples also sizes the out-of-sample measurement when there is no report half)
GIVEN_DATA_FLAGS = ("--calib-samples",)


def check_recorded(args: argparse.Namespace, plan: Plan, problems: Problems) -> None:
    """Without --model or --data, apply takes them from what the plan records: say when it records
    nothing to rebuild them from, and refuse the flags that would only shape the missing one."""
    if not args.model:
        if not (plan.data.get("model") or {}).get("spec"):
            problems.add("The plan does not record how to rebuild its model (its scan was made from objects in "
                         "Python). Pass --model SPEC (and --weights FILE).")
        if args.model_arg:
            problems.add("--model-arg only matters with --model. Add --model SPEC, or drop it.")
    if args.data:
        return
    rec = (plan.data.get("scan") or {}).get("sample") or {}
    if not rec.get("kind"):
        problems.add("The plan does not record its scan's data (the scan was given data in Python). Pass "
                     "--data SPEC.")
        return
    given = [f"--{k.replace('_', '-')}" for k in DATA_FLAGS if getattr(args, k, None)]
    given += [f for f in GIVEN_DATA_FLAGS if flag_given(args, f)]
    if given:
        them = "it" if len(given) == 1 else "them"
        problems.add(f"{', '.join(given)} only {'shapes' if len(given) == 1 else 'shape'} --data; without --data, "
                     f"apply measures on the scan's data as the plan records it ({rec.get('spec')}), and reads "
                     f"--train-data the same way. Add --data SPEC, or drop {them}.")
    if args.train_data:
        try:
            train = data_spec(args.train_data, args, "--train-data")
        except UserInputError:
            return  # reported by check_finetune
        if train.same_source(args.recorded_data):
            problems.add(f"--train-data {args.train_data} is the data the model is measured on (the scan's data "
                         f"{rec.get('spec')}): distillation would train on the images it is then scored on, and "
                         f"the measured drop would flatter the plan. Pass a training split (e.g. digits:train, or "
                         f"the train/ folder beside test/).")


def recorded_defaults(args: argparse.Namespace, plan: Plan) -> None:
    """Without --data, --train-data is read as the scan read its data (preprocessing, class map,
    tokenizer and windows: ``args.recorded_data``); without --model, text data takes the plan's
    Hugging Face model's tokenizer (``args.recorded_model``)."""
    from sensplan.sensitivity import DataSpec

    rec = (plan.data.get("scan") or {}).get("sample") or {}
    if not args.data and rec.get("kind"):
        args.recorded_data = DataSpec.from_record(dict(rec))
    source = str(((plan.data.get("model") or {}).get("spec") or {}).get("source") or "")
    if not args.model and source.startswith("hf:"):
        args.recorded_model = source


def plan_model(args: argparse.Namespace, plan: Plan) -> tuple[Any, ModelSpec]:
    """The model the plan records (without --model), rebuilt and checked by digest."""
    from sensplan.cli._common import PlanAsScan
    from sensplan.planner import model_from_scan

    notes: list[str] = []
    model, spec = model_from_scan(PlanAsScan(plan), weights=args.weights, allow_pickle=args.allow_pickle,
                                  notes=notes, purpose="Applying the plan",
                                  fix="pass --model SPEC and its --weights FILE",
                                  in_python="apply_plan(model, plan, ...)")
    for n in notes:
        say(f"note: {n}")
    say(f"model: {spec.source}, as the plan records it")
    return model, spec


def plan_data(args: argparse.Namespace, plan: Plan) -> tuple[EvalSet, EvalSet | None]:
    """The scan's sample and calibration as the plan records them (without --data), drawn again
    and checked by digest; no calibration with --no-bn-recalibration."""
    from sensplan.planner import scan_sample

    rec = plan.data.get("scan") or {}
    sample, calib, _, _ = scan_sample(rec["sample"], rec.get("calibration"),
                                      " Run apply where the scan's data is, or pass --data SPEC.")
    say(f"data: {rec['sample'].get('spec')}, as the plan records it")
    return sample, None if args.no_bn_recalibration else calib


def check_weights_match(args: argparse.Namespace, plan: Plan, problems: Problems) -> None:
    """Before loading: a plan whose scan read a weights file needs --weights (with --model; without
    it, the recorded file is found and checked)."""
    was = (plan.data.get("model") or {}).get("weights")
    if args.weights is None and was and args.model:
        problems.add(f"The plan was made from a scan of the weights {was!r}; pass them with --weights "
                     f"(its predictions do not hold for other weights).")


def check_weights_values(args: argparse.Namespace, plan: Plan, model: Any) -> None:
    """After loading: the model's weight values are those the plan's scan measured (by the digest of
    the values, so the same weights saved in another file still match; by the file's sha256 for
    plans from before the digest was recorded)."""
    from sensplan._artifacts import file_sha256
    from sensplan.sensitivity import weights_digest

    rec = plan.data.get("model") or {}
    source = str((rec.get("spec") or {}).get("source") or "")
    folder = source.startswith("hf:") and not args.weights  # the weights are the folder's files
    was = rec.get("weights") or (f"the files of {source} at scan time" if folder else "weights set in Python")
    got = (f"--weights {args.weights}" if args.weights else f"the files of {source} now" if folder
           else "randomly initialised weights (no --weights)")
    if rec.get("weights_digest"):
        same = weights_digest(model) == rec["weights_digest"]
    elif rec.get("weights_sha256") and args.weights:
        same = file_sha256(args.weights) == rec["weights_sha256"]
    else:
        return
    if not same:
        fix = ("Restore the folder's files, or scan and plan again with these." if folder else
               "Pass the scan's --weights, or scan and plan again with these.")
        raise UserInputError(f"The model's weights ({got}) are not the ones the plan was made from ({was}): "
                             f"its predicted drops and choices are for those. {fix}")


def main(args: argparse.Namespace) -> int:
    from sensplan.planner import Plan
    from sensplan.planner._apply import check_compatible

    problems = Problems()
    plan = problems.check(partial(Plan.load, args.plan))
    if plan is not None:
        recorded_defaults(args, plan)
    variants, ft = check(args, problems)
    out = Path(args.out)
    check_outputs(problems, result_outputs(out, variants, runtime=args.runtime))
    if plan is not None and not problems.messages:
        check_recorded(args, plan, problems)
        check_weights_match(args, plan, problems)
    problems.raise_if_any()
    table_threads(args, need(plan))
    set_threads(args)
    if args.model:
        model, spec = load_model(args)
    else:
        model, spec = plan_model(args, need(plan))
    check_compatible(model, need(plan))  # before loading data: a plan for another model fails fast
    if args.model or args.weights:
        check_weights_values(args, need(plan), model)
    loader = train_loader(args, ft)
    data, calib = load_data(args) if args.data else plan_data(args, need(plan))
    missed = execute(args, need(plan), variants, model, spec, data, calib, loader, ft, out)
    print(os.fspath(out))
    return report_missed("apply", missed, variants)
