"""The executor: apply a plan to a copy of the model, fine-tune with distillation, measure, save.

Order (as the field learned it): prune structurally -> fine-tune with the original model as teacher
-> quantize weights. Pruning uses the scanner's channel-selection criterion
(``PruningGraph.select``) and Torch-Pruning's structural surgery, so the channels the scan removed
are the channels the executor removes; quantization uses the scanner's quantizer.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensplan._artifacts import now_iso, read_json, versions, write_json
from sensplan._errors import IncompatibleModelError, UserInputError
from sensplan.planner._compressed import CompressedModel, load_compressed, save_compressed
from sensplan.planner._costs import ACTIVATION_BITS
from sensplan.planner._plan import Plan
from sensplan.sensitivity._data import EvalSet
from sensplan.sensitivity._eval import (
    batchnorm_statistics,
    evaluate,
    recalibrate_batchnorm_,
    tune_malloc,
)
from sensplan.sensitivity._groups import PruningGraph, count_macs
from sensplan.sensitivity._models import ModelSpec, architecture_digest
from sensplan.sensitivity._quant import FLOAT_BITS, dequantize, quantize_per_channel

METRICS_FORMAT = "sensplan.metrics"
METRICS_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class FineTuneConfig:
    """Knowledge-distillation fine-tuning: ``epochs`` over the training data, SGD with momentum 0.9
    and a cosine learning-rate decay from ``lr``; loss = ``alpha`` * T^2 * KL(teacher_T || student_T)
    + (1 - ``alpha``) * cross-entropy, at ``temperature`` T. ``max_steps`` caps the optimizer steps."""

    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 128
    temperature: float = 4.0
    alpha: float = 0.7
    weight_decay: float = 5e-4
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise UserInputError(f"The 'epochs' parameter must be >= 0. Got {self.epochs} instead.")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserInputError(f"The 'alpha' parameter must be a float in the range [0.0, 1.0]. Got {self.alpha} instead.")
        if self.temperature <= 0:
            raise UserInputError(f"The 'temperature' parameter must be > 0. Got {self.temperature} instead.")
        if self.lr <= 0:
            raise UserInputError(f"The 'lr' parameter must be > 0. Got {self.lr} instead.")


def check_compatible(model: nn.Module, plan: Plan, example_input: torch.Tensor | None = None) -> None:
    """Fail before any expensive step if ``plan`` does not belong to ``model``: architecture digest,
    layer names and (given ``example_input``) every pruned group of every allocation."""
    want = plan.data["model"].get("architecture_digest")
    got = architecture_digest(model)
    if want and want != got:
        raise IncompatibleModelError(
            f"The plan was made for a model with architecture digest {want}, but this model has {got}: "
            f"the layer names or shapes differ. Pass the same --model (and --model-arg) used for the scan.")
    modules = dict(model.named_modules())
    for name, alloc in plan.data["plans"].items():
        if alloc is None:
            continue
        missing = [q for q in alloc["quantize"] if q not in modules]
        if missing:
            raise IncompatibleModelError(f"The plan's {name!r} allocation quantizes {missing[:3]}, which this model "
                                         f"does not have. Was the plan made from a scan of this model?")
        if example_input is not None:
            _choose(PruningGraph(model, example_input), alloc)


def _choose(graph: PruningGraph, allocation: Mapping[str, Any]) -> dict[str, list[int]]:
    """Validate the plan's pruning entries against ``graph`` and pick each group's channels."""
    entries = {g: e for g, e in allocation["prune"].items() if int(e.get("n_remove", 0)) > 0}
    known = set(graph.group_ids())
    for gid, e in entries.items():
        if gid not in known:
            raise IncompatibleModelError(f"The plan prunes group {gid!r}, which this model does not have. "
                                         f"Was the plan made from a scan of this model?")
        if e.get("status", "scanned") != "scanned":
            raise UserInputError(f"The plan prunes group {gid!r}, which the scan skipped "
                                 f"({e.get('reason', 'unsafe')}). Remove it from the plan.")
        if graph.channels(gid) != int(e["channels"]):
            raise IncompatibleModelError(f"Group {gid!r} has {graph.channels(gid)} channels in this model but "
                                         f"{e['channels']} in the plan.")
    # every choice is made on the unpruned weights, as the scan saw them
    return {gid: graph.select(gid, int(e["n_remove"])) for gid, e in entries.items()}


def prune_(model: nn.Module, allocation: Mapping[str, Any], example_input: torch.Tensor) -> dict[str, list[int]]:
    """Structurally prune ``model`` in place as ``allocation["prune"]`` says; return removed indices."""
    graph = PruningGraph(model, example_input)
    chosen = _choose(graph, allocation)
    for gid, idxs in chosen.items():
        graph.prune_(gid, idxs)
    return chosen


@torch.no_grad()
def quantize_(model: nn.Module, allocation: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Round the weights of every layer with bits < 32 in place; return their codes and scales."""
    modules = dict(model.named_modules())
    codes = {}
    for layer, e in allocation["quantize"].items():
        bits = int(e["bits"])
        if bits == FLOAT_BITS:
            continue
        if layer not in modules or not hasattr(modules[layer], "weight"):
            raise IncompatibleModelError(f"The plan quantizes {layer!r}, which this model does not have.")
        w = modules[layer].weight
        q, s = quantize_per_channel(w, bits)
        w.copy_(dequantize(q, s, w.dtype))
        codes[layer] = (q, s, bits)
    return codes


def distill_(student: nn.Module, teacher: nn.Module, loader: Any, cfg: FineTuneConfig,
             progress: bool | None = None) -> list[dict[str, float]]:
    """Fine-tune ``student`` in place with knowledge distillation from ``teacher`` (kept in eval).

    Returns one record per epoch: mean loss and training top-1.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(1, total))))
    t = cfg.temperature
    history = []
    step = 0
    for epoch in range(cfg.epochs):
        student.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in tqdm(loader, desc=f"fine-tune {epoch + 1}/{cfg.epochs}", unit="batch",
                         disable=None if progress is None else not progress, leave=False):
            if step >= total:
                break
            with torch.no_grad():
                soft = torch.log_softmax(teacher(x) / t, dim=1)
            logits = student(x)
            kd = nn.functional.kl_div(torch.log_softmax(logits / t, dim=1), soft, log_target=True,
                                      reduction="batchmean") * t * t
            loss = cfg.alpha * kd + (1 - cfg.alpha) * nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "train_top1": correct / max(1, seen),
                        "steps": step})
        if step >= total:
            break
    student.eval()
    return history


@torch.inference_mode()
def latency(model: nn.Module, example_input: torch.Tensor, *, warmup: int = 10, iters: int = 100,
            max_seconds: float = 10.0) -> dict[str, float]:
    """CPU latency of one forward pass at batch 1: p50 and p95 in milliseconds (wall clock)."""
    tune_malloc()
    model.eval()
    x = example_input[:1]
    for _ in range(warmup):
        model(x)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < iters and (len(times) < 10 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[min(len(times) - 1, int(0.95 * len(times)))],
            "iters": len(times), "threads": torch.get_num_threads()}


def measure(model: nn.Module, data: EvalSet, file_bytes: int, *, layer_bits: Mapping[str, int] | None = None,
            batch_size: int = 500, timing: bool = True) -> dict[str, Any]:
    """What a model really costs and scores: top-1, loss, params, MACs, BOPs (layers not in
    ``layer_bits`` count as float32), file size, latency."""
    ev = evaluate(model, data, batch_size)
    layer_macs = count_macs(model, data.example_input)
    bits = layer_bits or {}
    out: dict[str, Any] = {"top1": ev.top1, "loss": ev.loss, "n": ev.n,
                           "params": int(sum(p.numel() for p in model.parameters())),
                           "macs": int(sum(layer_macs.values())),
                           "bops": int(sum(v * bits.get(k, FLOAT_BITS) * ACTIVATION_BITS
                                           for k, v in layer_macs.items())),
                           "file_bytes": int(file_bytes)}
    if timing:
        out["latency"] = latency(model, data.example_input)
    return out


def compress(model: nn.Module, plan: Plan, variant: str, example_input: torch.Tensor, *,
             calib: EvalSet | None = None, train_loader: Any = None, finetune: FineTuneConfig | None = None,
             model_spec: ModelSpec | None = None, progress: bool | None = None) -> tuple[CompressedModel, list[dict[str, float]]]:
    """Prune, optionally distil, quantize and recalibrate a deep copy of ``model`` (never modified).

    Without fine-tuning, the executor does exactly what the scan's probes measured: zero the chosen
    channels, quantize, recalibrate BatchNorm against the original (``calib``), and only then remove
    the zeroed channels structurally (zeroing equals removal; the scan checked that per group).
    With fine-tuning: prune, distil from ``model``, quantize, recalibrate against the fine-tuned
    float model.
    """
    check_compatible(model, plan)
    alloc = plan.variant(variant)
    student = copy.deepcopy(model).eval()
    graph = PruningGraph(student, example_input)
    chosen = _choose(graph, alloc)
    history: list[dict[str, float]] = []
    if train_loader is not None and finetune is not None and finetune.epochs > 0:
        for gid, idxs in chosen.items():
            graph.prune_(gid, idxs)
        history = distill_(student, model, train_loader, finetune, progress)
        reference = batchnorm_statistics(student, calib) if calib is not None else {}
        quantize_(student, alloc)
        recalibrate_batchnorm_(student, calib, reference)
    else:
        reference = batchnorm_statistics(model, calib) if calib is not None else {}
        for gid, idxs in chosen.items():
            graph.zero_(gid, idxs)
        quantize_(student, alloc)
        recalibrate_batchnorm_(student, calib, reference)
        for gid, idxs in chosen.items():
            graph.prune_(gid, idxs)
    # Codes of the final (pruned) weights. Re-quantizing an already quantized channel returns the
    # same codes: its largest code sits at the range's end, so the clipping search picks ratio 1.
    codes = quantize_(student, alloc)
    cm = CompressedModel(student, chosen, codes, model_spec, architecture_digest(model),
                         tuple(example_input.shape[1:]), {"variant": variant, **alloc})
    return cm, history


def apply_plan(model: nn.Module, plan: Plan, data: EvalSet, out_dir: str | os.PathLike[str], *,
               variant: str = "planned", calib: EvalSet | None = None, train_loader: Any = None,
               finetune: FineTuneConfig | None = None,
               model_spec: ModelSpec | None = None, timing: bool = True, progress: bool | None = None,
               before: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Apply one allocation of ``plan`` and measure it against the original; write to ``out_dir``:
    ``model.sensplan`` (the compressed model), ``metrics.json`` and ``plan.json`` (the plan applied).

    ``model`` is never modified. Returns the metrics dictionary. Example::

        metrics = apply_plan(model, Plan.load("plan.json"), load_eval_set(DataSpec.parse("digits")), "out")
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    example = data.example_input
    if before is None:
        before = measure_original(model, data, model_spec, timing=timing)
    cm, history = compress(model, plan, variant, example, calib=calib, train_loader=train_loader,
                           finetune=finetune, model_spec=model_spec, progress=progress)
    no_ft = None
    if history:  # what the scan predicts is the drop before fine-tuning: measure that too
        raw, _ = compress(model, plan, variant, example, calib=calib, model_spec=model_spec)
        no_ft = evaluate(raw.module, data).to_dict()
    file_bytes = save_compressed(cm, out / "model.sensplan")
    reloaded = load_compressed(out / "model.sensplan", copy.deepcopy(model))
    after = measure(reloaded, data, file_bytes, layer_bits={k: b for k, (_, _, b) in cm.codes.items()},
                    timing=timing)
    after["payload_bytes"] = cm.payload_bytes()
    with torch.inference_mode():
        gap = float((reloaded(example) - cm.module(example)).abs().max())
    after["reload_max_abs_diff"] = gap
    alloc = plan.variant(variant)
    predicted = dict(alloc["predicted"])
    comparison = {}
    for m, measured in (("macs", after["macs"]), ("params", after["params"]), ("size", after["payload_bytes"]),
                        ("bops", after["bops"])):
        comparison[m] = {"predicted": predicted[m], "measured": measured,
                         "ratio": measured / predicted[m] if predicted[m] else None}
    measured_drop_no_ft = before["top1"] - (no_ft["top1"] if no_ft else after["top1"])
    comparison["drop_without_finetune"] = {"predicted": predicted["drop"], "measured": measured_drop_no_ft}
    budgets = []
    for b in plan.data["objective"]["budgets"]:
        value = {"macs": after["macs"], "params": after["params"], "size": after["payload_bytes"],
                 "bops": after["bops"]}[b["metric"]]
        budgets.append({**b, "measured": value, "met": value <= b["absolute"] * (1 + 1e-6)})
    metrics = {
        "format": METRICS_FORMAT,
        "schema_version": METRICS_SCHEMA_VERSION,
        "created": now_iso(),
        "versions": versions(),
        "variant": variant,
        "plan": {"path": plan.path or None, "sha256": plan.sha256 or None},
        "data": data.description.get("spec"),
        "before": dict(before),
        "after_without_finetune": no_ft,
        "after": after,
        "predicted": predicted,
        "comparison": comparison,
        "budgets": budgets,
        "fine_tune": ({"config": finetune.__dict__, "history": history} if history and finetune else None),
        "bn_recalibration": calib.description if calib is not None else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(out / "plan.json", dict(plan.data))
    write_json(out / "metrics.json", metrics)
    return metrics


def measure_original(model: nn.Module, data: EvalSet, model_spec: ModelSpec | None, *,
                     timing: bool = True) -> dict[str, Any]:
    """The uncompressed model measured the same way (its file: the same container, all float)."""
    cm = CompressedModel(model, {}, {}, model_spec, architecture_digest(model), tuple(data.example_input.shape[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        size = save_compressed(cm, Path(tmp) / "original.sensplan")
    m = measure(model, data, size, timing=timing)
    m["payload_bytes"] = cm.payload_bytes()
    return m


def load_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    return read_json(p, METRICS_FORMAT, (METRICS_SCHEMA_VERSION,))

