"""The executor: apply a plan to a copy of the model, fine-tune with distillation, measure, save.

Order (as the field learned it): prune structurally -> fine-tune with the original model as teacher
-> quantize and sparsify. The executor calls the same method plug-ins the scanner probed
(:mod:`sensplan.sensitivity.methods`), so the channels the scan removed are the channels the
executor removes and the quantizer is the same; it never branches on a method's name.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import shutil
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensplan._artifacts import now_iso, versions, write_json
from sensplan._effects import LAYER_DEFAULTS, merge, merge_per_unit, row_length
from sensplan._errors import ArtifactError, IncompatibleModelError, UserInputError, first_line
from sensplan._tables import METRICS_FORMAT, METRICS_SCHEMA_VERSION, load_metrics  # noqa: F401
from sensplan.planner._compressed import CompressedModel, load_compressed, payload_size, save_compressed
from sensplan.planner._plan import Plan, assignments
from sensplan.sensitivity import (
    INT_CODES,
    EvalSet,
    ModelSpec,
    PruningGraph,
    architecture_digest,
    batchnorm_state_restored,
    batchnorm_statistics,
    channel_graph,
    count_macs,
    device_of,
    recalibrate_batchnorm_,
    tune_malloc,
)
from sensplan.sensitivity.methods import Method, MethodContext, compatible, execution_order, get_method
from sensplan.sensitivity.tasks import Task, get_task


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
            raise UserInputError(f"The 'alpha' parameter must be a float in the range [0.0, 1.0]. "
                                 f"Got {self.alpha} instead.")
        if self.temperature <= 0:
            raise UserInputError(f"The 'temperature' parameter must be > 0. Got {self.temperature} instead.")
        if self.lr <= 0:
            raise UserInputError(f"The 'lr' parameter must be > 0. Got {self.lr} instead.")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise UserInputError(f"The 'batch_size' parameter must be a positive integer. Got "
                                 f"{self.batch_size!r} instead.")
        if self.weight_decay < 0:
            raise UserInputError(f"The 'weight_decay' parameter must be >= 0. Got {self.weight_decay} instead.")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserInputError(f"The 'max_steps' parameter must be a positive integer or None. Got "
                                 f"{self.max_steps} instead.")


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
    graph = None
    for name, alloc in plan.data["plans"].items():
        if alloc is None:
            continue
        _check_pairs(name, alloc)
        for method, units in assignments(alloc).items():
            m = get_method(method, named_in="The plan")
            _check_settings(name, m, units, alloc)
            if m.unit_kind == "layer":
                missing = [u for u in units if u not in modules]
                if missing:
                    raise IncompatibleModelError(
                        f"The plan's {name!r} allocation applies {method} to {missing[:3]}, which this "
                        f"model does not have. Was the plan made from a scan of this model?")
            elif example_input is not None and units:
                graph = graph or channel_graph(model, example_input)
                _check_groups(graph, alloc, units)


def _group_channels(alloc: Mapping[str, Any]) -> dict[str, Any]:
    """Group -> its channel count as the plan records it."""
    return {c["unit"]: c.get("channels") for c in alloc["choices"].values() if c["kind"] == "group"}


def _check_settings(name: str, method: Method, units: Mapping[str, Any], alloc: Mapping[str, Any]) -> None:
    """Every setting is one the method accepts, and every pruning removes some channels and keeps
    some (a plan edited by hand, or corrupt, fails here rather than half-way through apply)."""
    again = "The plan file was edited or is corrupt: make it again with `sensplan plan`."
    channels = _group_channels(alloc)
    for unit, setting in units.items():
        try:
            method.check_setting(setting)
        except (ValueError, TypeError, KeyError, UserInputError) as e:
            raise ArtifactError(f"The plan's {name!r} allocation sets {method.name} on {unit!r} to "
                                f"{dict(setting)}, which is not a valid setting ({e}). {again}") from None
        if method.unit_kind == "group" and "n_remove" in setting:
            k, n = setting["n_remove"], channels.get(unit)
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or (n is not None and k >= int(n)):
                raise ArtifactError(f"The plan's {name!r} allocation removes {k!r} channels of group {unit!r}"
                                    f"{f', which has {n}' if n is not None else ''}: it must remove at least "
                                    f"one and keep at least one. {again}")


def _check_pairs(name: str, alloc: Mapping[str, Any]) -> None:
    """No unit gets two methods that cannot change it together, nor two structures (the planner
    never chooses such a pair; a plan edited by hand might). A group and a layer of the same name
    are different units."""
    again = "The plan file was edited or is corrupt: make it again with `sensplan plan`."
    per_unit: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for c in alloc["choices"].values():
        if c.get("method"):
            per_unit.setdefault((c["kind"], c["unit"]), []).append(c)
    for (_, unit), chosen in per_unit.items():
        for x, y in itertools.combinations(chosen, 2):
            a, b = x["method"], y["method"]
            if a == b:
                raise ArtifactError(f"The plan's {name!r} allocation applies {a} twice to {unit!r} (under two "
                                    f"axes). {again}")
            if not compatible(get_method(a, named_in="The plan"), get_method(b, named_in="The plan")):
                raise ArtifactError(f"The plan's {name!r} allocation applies both {a} and {b} to {unit!r}, which "
                                    f"cannot change one unit together. {again}")
            if (x.get("effect") or {}).get("structure") is not None and \
                    (y.get("effect") or {}).get("structure") is not None:
                raise ArtifactError(f"The plan's {name!r} allocation restructures {unit!r} twice ({a} and {b}): a "
                                    f"layer takes one structure. {again}")


def _check_groups(graph: PruningGraph, alloc: Mapping[str, Any], units: Mapping[str, Any]) -> None:
    known = set(graph.group_ids())
    channels = _group_channels(alloc)
    for gid in units:
        if gid not in known:
            raise IncompatibleModelError(f"The plan prunes group {gid!r}, which this model does not have. "
                                         f"Was the plan made from a scan of this model?")
        if channels.get(gid) is not None and graph.channels(gid) != int(channels[gid]):
            raise IncompatibleModelError(f"Group {gid!r} has {graph.channels(gid)} channels in this model but "
                                         f"{channels[gid]} in the plan.")


def _context(model: nn.Module, example_input: torch.Tensor, calib: EvalSet | None,
             data: EvalSet | None) -> MethodContext:
    from sensplan.sensitivity import describe_model

    layers, tensors, graph, error = describe_model(model, example_input)
    groups = ({g: {"channels": graph.channels(g), "channel_step": graph.channel_step(g)}
               for g in graph.group_ids()} if graph is not None else {})
    return MethodContext(model, example_input, layers, groups, tensors, calib=calib, eval_data=data,
                         graph=graph, graph_error=error, device=example_input.device)


def _run(ctx: MethodContext, methods: list[tuple[Method, dict[str, Any]]], step: str) -> None:
    from sensplan.sensitivity.methods import METHODS

    for m, units in methods:
        with METHODS.failures(m.name, f"{step}_"):
            if step == "apply":
                m.apply_(ctx, units)
            else:
                m.finalize_(ctx, units)


def _apply_and_recalibrate(ctx: MethodContext, methods: list[tuple[Method, dict[str, Any]]],
                           calib: EvalSet | None, reference: Any) -> None:
    """Every method's ``apply_``, then BatchNorm recalibration. A method that calibrates on the
    model (activation ranges) runs last, on the model recalibrated as it will be; the statistics
    are then put back and recalibrated once more with its change in place, as the scan's probe
    recalibrated with it."""
    plain = [(m, u) for m, u in methods if not m.calibrates]
    calibrating = [(m, u) for m, u in methods if m.calibrates]
    _run(ctx, plain, "apply")
    if calibrating and plain:  # (nothing changed otherwise: the statistics are right as they are)
        with batchnorm_state_restored(ctx.model):
            recalibrate_batchnorm_(ctx.model, calib, reference)
            _run(ctx, calibrating, "apply")
    else:
        _run(ctx, calibrating, "apply")
    recalibrate_batchnorm_(ctx.model, calib, reference)


def layer_effects(plan_alloc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per layer, the merged effect of the allocation's layer choices."""
    return merge_per_unit((c["unit"], c.get("effect", {})) for c in plan_alloc["choices"].values()
                          if c.get("method") and c["kind"] == "layer")


def distill_(student: nn.Module, teacher: nn.Module, loader: Any, cfg: FineTuneConfig,
             progress: bool | None = None) -> list[dict[str, float]]:
    """Fine-tune ``student`` in place with knowledge distillation from ``teacher`` (kept in eval).

    Returns one record per epoch: mean loss and training top-1.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    teacher.eval()
    dev = device_of(student)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(1, total))))
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
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with torch.no_grad():
                soft = torch.log_softmax(teacher(x) / t, dim=1)
            logits = student(x)
            if logits.dim() != 2:
                raise UserInputError(
                    f"Fine-tuning distils class logits, but the model returns {tuple(logits.shape)} (a language "
                    f"or embedding model). Apply without --train-data.")
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
            max_seconds: float = 10.0) -> dict[str, Any]:
    """Latency of one forward pass of one model at batch 1 on the model's device: p50 and p95 in
    milliseconds (wall clock; CUDA is synchronised after each pass). To compare two models, time
    them interleaved instead (:func:`sensplan.planner._runtime.compare_latency`, as apply does)."""
    from sensplan.planner._runtime import time_interleaved

    tune_malloc()
    model.eval()
    x = example_input[:1]
    sync = torch.cuda.synchronize if x.device.type == "cuda" else None
    t = time_interleaved({"model": lambda: model(x)}, warmup=warmup, max_iters=iters, max_seconds=max_seconds,
                         sync=sync)["model"]
    return {**t, "threads": torch.get_num_threads(), "device": str(x.device)}


def measure(model: nn.Module, data: EvalSet, file_bytes: int, *, task: Task | None = None,
            task_state: Any = None, effects: Mapping[str, Mapping[str, Any]] | None = None,
            batch_size: int = 500, timing: bool = True, original: Collection[str] | None = None) -> dict[str, Any]:
    """What a model really costs and scores: the task's score and loss, params, MACs, BOPs (layers
    without an effect count as float32 weights and activations; a layer a structural method created,
    one not among the ``original`` model's module names, takes the effect of the unit it replaced),
    file size, latency."""
    t = task or get_task("classification")
    ev = t.evaluate(model, data, task_state, batch_size)
    layer_macs = count_macs(model, data.example_input)
    eff = {k: merge([v]) for k, v in (effects or {}).items()}
    bops = 0.0
    for name, macs in layer_macs.items():
        unit = name if original is None or name in original else _unit_of(name, eff)
        e = eff.get(unit, LAYER_DEFAULTS)
        bops += macs * e["weight_bits"] * e["act_bits"]
    out: dict[str, Any] = {"score": ev.score, "loss": ev.loss, "n": ev.n, "per_class": per_class(ev, data),
                           "params": int(sum(p.numel() for p in model.parameters())),
                           "macs": int(sum(layer_macs.values())), "bops": int(bops),
                           "file_bytes": int(file_bytes), **per_sample_record(ev, data)}
    if timing:
        out["latency"] = latency(model, data.example_input)
    return out


def per_sample_record(ev: Any, data: EvalSet) -> dict[str, Any]:
    """The task's score of every measured item (rounded to 6 significant digits) and the digest of
    which items they are (``items``): two variants measured on the same items compare pairwise, so
    the report gives their difference a paired standard error. Empty without per-sample scores."""
    per = getattr(ev, "per_sample", None)
    if per is None or len(per) != ev.n:
        return {}
    return {"per_sample": [float(f"{v:.6g}") for v in per.detach().double().cpu().tolist()],
            "items": data.description.get("indices_sha256")}


def per_class(ev: Any, data: EvalSet) -> dict[str, dict[str, float]] | None:
    """The task's per-sample score averaged per class label (``n`` items each): a compression that
    quietly ruins one class shows here. None for data without one integer label per item, or a task
    without per-sample scores."""
    per = getattr(ev, "per_sample", None)
    y = data.y
    if per is None or y.dim() != 1 or len(per) != len(y) or y.dtype not in (torch.int64, torch.int32):
        return None
    per, y = per.detach().double().cpu(), y.cpu()
    out = {}
    for label in torch.unique(y[y >= 0]).tolist():
        mask = y == label
        name = data.classes[label] if 0 <= label < len(data.classes) else str(label)
        out[name] = {"n": int(mask.sum()), "score": float(per[mask].mean())}
    return out or None


#: classes with fewer measured items than this are listed after the others: their change is noise
MIN_CLASS_ITEMS = 20


def class_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per class present in both, before and after, ascending by ``after - before`` (the caller
    reverses it for a lower-is-better metric); classes with fewer than :data:`MIN_CLASS_ITEMS`
    items come after the rest (a change on a handful of items is noise)."""
    b, a = before.get("per_class") or {}, after.get("per_class") or {}
    rows = [{"class": c, "n": b[c]["n"], "before": b[c]["score"], "after": a[c]["score"],
             "change": a[c]["score"] - b[c]["score"]} for c in b if c in a]
    return sorted(rows, key=lambda r: (r["n"] < MIN_CLASS_ITEMS, r["change"]))


def _unit_of(module: str, units: Mapping[str, Any]) -> str:
    """The unit a module belongs to: itself, or the longest unit name it sits inside (a layer a
    structural method replaced by several)."""
    name = module
    while name and name not in units:
        name = name.rpartition(".")[0]
    return name or module


def compress(model: nn.Module, plan: Plan, variant: str, example_input: torch.Tensor, *,
             calib: EvalSet | None = None, data: EvalSet | None = None, train_loader: Any = None,
             finetune: FineTuneConfig | None = None, model_spec: ModelSpec | None = None,
             progress: bool | None = None, bn_reference: Mapping[str, Any] | None = None
             ) -> tuple[CompressedModel, list[dict[str, float]]]:
    """Apply one allocation to a deep copy of ``model`` (never modified).

    Without fine-tuning, the executor does exactly what the scan's probes measured: every method's
    ``apply_`` in stage order (pruning zeroes its channels), BatchNorm recalibration against the
    original (``calib``), then every ``finalize_`` (pruning removes the zeroed channels
    structurally: zeroing equals removal, the scan checked that per group). With fine-tuning:
    structural methods first, distillation from ``model``, then the others, recalibrated against the
    fine-tuned float model. ``bn_reference``: ``model``'s BatchNorm statistics on ``calib``
    (:func:`batchnorm_statistics`), when the caller measured them already (a verifier compressing
    many candidates); without fine-tuning only.
    """
    check_compatible(model, plan)
    alloc = plan.variant(variant)
    student = copy.deepcopy(model).eval()
    ctx = _context(student, example_input, calib, data)
    methods = sorted(((get_method(m, named_in="The plan"), u) for m, u in assignments(alloc).items()),
                     key=lambda mu: execution_order(mu[0]))
    groups = {u: s for m, us in methods if m.unit_kind == "group" for u, s in us.items()}
    if groups and ctx.graph is None:
        raise UserInputError(f"The plan prunes channel groups, but {ctx.graph_error}")
    if groups:
        _check_groups(ctx.graph, alloc, groups)
    history: list[dict[str, float]] = []
    if train_loader is not None and finetune is not None and finetune.epochs > 0:
        first = [(m, u) for m, u in methods if m.structural]
        rest = [(m, u) for m, u in methods if not m.structural]
        _run(ctx, first, "apply")
        _run(ctx, first, "finalize")
        ctx.removed.clear()  # the channels are gone: later methods see the pruned model as it is
        history = distill_(student, model, train_loader, finetune, progress)
        reference = batchnorm_statistics(student, calib) if calib is not None else {}
        _apply_and_recalibrate(ctx, rest, calib, reference)
        _run(ctx, rest, "finalize")
    else:
        if bn_reference is None:
            bn_reference = batchnorm_statistics(model, calib) if calib is not None else {}
        _apply_and_recalibrate(ctx, methods, calib, bn_reference)
        _run(ctx, methods, "finalize")
    weight_effects: dict[str, dict[str, Any]] = {}
    row_lens: dict[str, int] = {}
    for layer, effect in layer_effects(alloc).items():
        if layer in ctx.layers:
            for key, _ in ctx.unit_weights(layer):  # a restructured layer stores several weights
                weight_effects[key] = effect
                row_lens[key] = row_length(ctx.layers[layer]["weight_shape"])
    records = [(m.name, ctx.records[m.name]) for m, _ in methods if m.name in ctx.records]
    cm = CompressedModel(student, records, weight_effects, row_lens, model_spec, architecture_digest(model),
                         tuple(example_input.shape[1:]), {"variant": variant, **alloc},
                         codes=ctx.cache.get(INT_CODES, {}))
    return cm, history


def apply_plan(model: nn.Module, plan: Plan, data: EvalSet, out_dir: str | os.PathLike[str], *,
               variant: str = "planned", calib: EvalSet | None = None, train_loader: Any = None,
               finetune: FineTuneConfig | None = None,
               model_spec: ModelSpec | None = None, timing: bool = True, progress: bool | None = None,
               before: Mapping[str, Any] | None = None,
               device: str | torch.device | None = None, measured_on: str | None = None,
               runtime: str = "torch", latency_batch: int = 32,
               original_onnx: str | os.PathLike[str] | None = None,
               original_on_runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Apply one allocation of ``plan`` and measure it against the original; write to ``out_dir``:
    ``model.sensplan`` (the compressed model), ``metrics.json`` and ``plan.json`` (the plan applied).

    ``data`` is what the model is measured on: pass images the plan was not chosen on (the CLI's
    apply does, see ``sensplan.cli.apply.measurement_data``); ``measured_on`` says which, in
    metrics.json.

    ``device`` runs everything there (on a copy of ``model``); the file is the same on any device.
    ``timing``: latency p50/p95 of the original and the compressed model at batch 1 and at
    ``latency_batch``, timed interleaved in this process on torch's thread count, with the machine's
    load (``metrics["timing"]``, and a warning there when the load made them unreliable).
    ``runtime="onnxruntime"`` also writes ``model.onnx`` (pruned shapes, the plan's int8 layers as
    QDQ nodes) and measures it on ONNX Runtime against the original's export (``metrics["runtime"]``;
    ``original_onnx``: that export, and ``original_on_runtime`` its
    :func:`~sensplan.planner._onnx.ort_measurements`, when the caller made them once for several
    variants).
    ``model`` is never modified. Returns the metrics dictionary; ``metrics["budgets"]`` says which
    budgets were met (the CLI exits non-zero when one is missed). Example::

        metrics = apply_plan(model, Plan.load("plan.json"), load_eval_set(DataSpec.parse("digits")), "out")
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if device is not None and torch.device(device) != device_of(model):
        model = copy.deepcopy(model).to(device)  # the user's model stays where it is
    dev = device_of(model)
    data = data.to(dev)
    calib = calib.to(dev) if calib is not None else None
    example = data.example_input
    task = get_task(plan.data["task"]["name"], named_in="The plan")
    state = task.prepare(model, data)
    if before is None:
        before = measure_original(model, data, model_spec, timing=False, task=task, task_state=state)
    cm, history = compress(model, plan, variant, example, calib=calib, data=data, train_loader=train_loader,
                           finetune=finetune, model_spec=model_spec, progress=progress)
    no_ft = None
    if history:  # what the scan predicts is the drop before fine-tuning: measure that too
        raw, _ = compress(model, plan, variant, example, calib=calib, data=data, model_spec=model_spec)
        ev = task.evaluate(raw.module, data, state)
        no_ft = {**ev.to_dict(), **per_sample_record(ev, data)}
        del raw
    # The model file is written under a temporary name and takes its place after metrics.json and
    # plan.json: a failure before then leaves the previous result's three files as they were
    staged = out / f".model.sensplan.{os.getpid()}.partial"
    staged_hf = out / f".hf.{os.getpid()}.partial"  # a save_pretrained folder, for a model that can write one
    staged_onnx = out / f".model.onnx.{os.getpid()}.partial"
    try:
        after, reloaded = _save_and_measure(cm, staged, model, data, task, state, plan.variant(variant), staged_hf)
        after["bits"] = scope_bits(staged, plan.data.get("scope") or {})
        exported = after.pop("save_pretrained", None)
        del cm
        timed = None
        if timing:
            before, timed = _time_against_original(model, reloaded, example, before, after, latency_batch)
        on_runtime = None
        if runtime == "onnxruntime":
            from sensplan.planner._onnx import measure_on_onnxruntime

            effects = layer_effects(plan.variant(variant))
            on_runtime = measure_on_onnxruntime(
                model, reloaded, data, task, state, effects, staged_onnx,
                calib_x=(calib if calib is not None else data).x, threads=torch.get_num_threads(),
                batches=[1, latency_batch], timing=timing,
                original_onnx=Path(original_onnx) if original_onnx is not None else None,
                original_measured=original_on_runtime, unit_of=lambda n: _unit_of(n, effects))
            on_runtime["calibration"] = ("the plan's calibration data" if calib is not None else
                                         "the measurement data (no calibration data was given)")
        del reloaded
        comparison, budgets = _compare(plan, plan.variant(variant), before, after, no_ft,
                                       measured_latency(plan, timed, on_runtime))
        metrics = {
            "format": METRICS_FORMAT,
            "schema_version": METRICS_SCHEMA_VERSION,
            "created": now_iso(),
            "versions": versions(),
            "variant": variant,
            "plan": {"path": plan.path or None, "sha256": plan.sha256 or None},
            "task": dict(plan.data["task"]),
            "data": data.description.get("spec"),
            "measured_on": measured_on or f"{len(data)} items of {data.description.get('spec')}, as given",
            "before": dict(before),
            "after_without_finetune": no_ft,
            "after": after,
            "predicted": dict(plan.variant(variant)["predicted"]),
            "comparison": comparison,
            "budgets": budgets,
            "fine_tune": ({"config": finetune.__dict__, "history": history} if history and finetune else None),
            "bn_recalibration": calib.description if calib is not None else None,
            "per_class": class_changes(before, after) if plan.metric.higher_is_better else
            sorted(class_changes(before, after), key=lambda r: (r["n"] < MIN_CLASS_ITEMS, -r["change"])),
            "timing": timed,
            "runtime": on_runtime,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if exported is not None:
            metrics["save_pretrained"] = {**exported, **({"path": str(out / "hf")} if exported.get("saved") else {})}
        write_json(out / "plan.json", dict(plan.data))
        write_json(out / "metrics.json", metrics)
        os.replace(staged, os.path.realpath(out / "model.sensplan"))  # through a symlink, as the JSON files
        if on_runtime is not None:
            os.replace(staged_onnx, os.path.realpath(out / "model.onnx"))
        else:  # a previous result's model.onnx would contradict this one
            (out / "model.onnx").unlink(missing_ok=True)
        if exported is not None:
            shutil.rmtree(out / "hf", ignore_errors=True)  # a previous result's folder would contradict this one
            if exported.get("saved"):
                os.replace(staged_hf, out / "hf")
    finally:
        staged.unlink(missing_ok=True)
        staged_onnx.unlink(missing_ok=True)
        shutil.rmtree(staged_hf, ignore_errors=True)
    return metrics


def _time_against_original(model: nn.Module, compressed: nn.Module, example: torch.Tensor,
                           before: Mapping[str, Any], after: dict[str, Any], batch: int
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time the original and the compressed model interleaved in this process, at batch 1 and at
    ``batch`` (see :func:`sensplan.planner._runtime.compare_latency`): ``before`` with the original's
    batch-1 latency of this run, ``after["latency"]`` set, and the whole timing record."""
    from sensplan.planner._runtime import compare_latency

    tune_malloc()
    sync = torch.cuda.synchronize if example.device.type == "cuda" else None
    threads = torch.get_num_threads()
    info = {"threads": threads, "device": str(example.device)}
    with torch.inference_mode():
        timed = compare_latency({"original": model.eval(), "compressed": compressed.eval()}, example, [1, batch],
                                threads=threads, sync=sync)
    timed["device"] = str(example.device)
    one = timed["batches"]["1"]
    after["latency"] = {**one["compressed"], **info}
    return {**before, "latency": {**one["original"], **info}}, timed


def _save_and_measure(cm: CompressedModel, staged: Path, model: nn.Module, data: EvalSet, task: Task,
                      state: Any, alloc: Mapping[str, Any], staged_hf: Path | None = None
                      ) -> tuple[dict[str, Any], nn.Module]:
    """Write the compressed model to ``staged``, reload it into a copy of the original
    architecture and measure what was reloaded (the file is what a user deploys); returns the
    measurements and the reloaded model. A model with an ``export_pretrained(folder)`` method (a
    Hugging Face model) also writes its own format into ``staged_hf``: ``after["save_pretrained"]``
    says whether it could, and why not."""
    example = data.example_input
    file_bytes = save_compressed(cm, staged)
    payload_bytes = payload_size(staged)  # encoding again would quantize again
    with torch.inference_mode():
        compressed_out = cm.module(example)
    cm.module = nn.Module()  # one model fewer in memory while the file is reloaded (a 630M ViT: 2.5 GB)
    reloaded = load_compressed(staged, copy.deepcopy(model))
    after = measure(reloaded, data, file_bytes, task=task, task_state=state, effects=layer_effects(alloc),
                    timing=False, original={n for n, _ in model.named_modules()})
    after["payload_bytes"] = payload_bytes
    export = getattr(reloaded, "export_pretrained", None)
    if staged_hf is not None and callable(export):
        try:
            after["save_pretrained"] = export(staged_hf)
        except Exception as e:  # noqa: BLE001 - the compressed model stands; only this copy failed
            after["save_pretrained"] = {"saved": False, "reason": f"{type(e).__name__}: {first_line(e)}"}
    with torch.inference_mode():
        after["reload_max_abs_diff"] = float((reloaded(example) - compressed_out).abs().max())
    return after, reloaded


def scope_bits(path: str | os.PathLike[str], scope: Mapping[str, Any]) -> float | None:
    """The stored bits per original weight of the layers in ``scope`` (plan.json's ``scope``), read
    from the container's payload: every weight each such layer stores (its one weight, or the
    weights of the layers that replaced it), scales and zero points included, biases not."""
    from sensplan.planner._compressed import read_header

    total = int(scope.get("weights") or 0)
    if not total:
        return None
    header, _ = read_header(path, payload=False)  # the parts' lengths: no need for the tensors
    layers = set(scope.get("layers") or ())
    bits = 0
    for key, entry in header.get("tensors", {}).items():
        owner, _, leaf = key.rpartition(".")
        while owner and owner not in layers:
            owner = owner.rpartition(".")[0]
        if owner and leaf == "weight":
            bits += 8 * sum(int(n) for _, n in entry.get("parts", []))
    return bits / total


def latency_table(plan: Plan) -> dict[str, Any] | None:
    """The plan's measured latency table (a cost model with a runtime and a batch: ``sensplan
    profile``), as plan.json describes it; None without one."""
    for cm in plan.data.get("cost_models") or ():
        if cm.get("name") == "table" and (cm.get("measured") or {}).get("batch"):
            return dict(cm)
    return None


def measured_latency(plan: Plan, timed: Mapping[str, Any] | None, on_runtime: Mapping[str, Any] | None
                     ) -> dict[str, dict[str, float]]:
    """Per metric of the plan's latency table: the compressed and the original model's measured p50
    on the table's runtime at the table's batch (empty where apply did not time that)."""
    table = latency_table(plan)
    if table is None:
        return {}
    where = table["measured"]
    source = (on_runtime or {}).get("latency") if where.get("runtime") == "onnxruntime" else timed
    batch = ((source or {}).get("batches") or {}).get(str(where["batch"]))
    if not batch:
        return {}
    return {m: {"compressed": batch["compressed"]["p50_ms"], "original": batch["original"]["p50_ms"]}
            for m in table["metrics"]}


def _unmeasured(plan: Plan, metric: str) -> str:
    """Why apply has no measurement of a budget's ``metric``."""
    table = latency_table(plan)
    if table is not None and metric in table["metrics"]:
        m = table["measured"]
        return (f"not measured: the latency table was measured on {m.get('runtime')} at batch {m.get('batch')}; "
                f"apply with --runtime {m.get('runtime')} --latency-batch {m.get('batch')} (and timing on) to check it")
    return "not measured by apply (a cost-table metric)"


def _compare(plan: Plan, alloc: Mapping[str, Any], before: Mapping[str, Any], after: Mapping[str, Any],
             no_ft: Mapping[str, Any] | None, latency: Mapping[str, Mapping[str, float]] | None = None
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predicted against measured, per cost and for the drop; and every budget, met or not.
    ``latency``: a latency table's metric measured end to end (see :func:`measured_latency`)."""
    predicted = dict(alloc["predicted"])
    measured_costs = {"macs": after["macs"], "params": after["params"], "size": after["payload_bytes"],
                      "bops": after["bops"]}
    if after.get("bits") is not None:
        measured_costs["bits"] = after["bits"]
    for metric, lat in (latency or {}).items():
        measured_costs[metric] = lat["compressed"]
    comparison: dict[str, Any] = {m: {"predicted": predicted[m], "measured": v,
                                      "ratio": v / predicted[m] if predicted.get(m) else None}
                                  for m, v in measured_costs.items() if m in predicted}
    for metric, lat in (latency or {}).items():
        if metric in comparison:  # the table's error on the original too, and as fractions of it
            orig = float(plan.data["original"].get(metric) or 0.0)
            comparison[metric].update(
                original_predicted=orig, original_measured=lat["original"],
                error=comparison[metric]["ratio"] - 1.0 if comparison[metric]["ratio"] else None,
                fraction_predicted=predicted[metric] / orig if orig else None,
                fraction_measured=lat["compressed"] / lat["original"] if lat["original"] else None)
    drop = plan.metric.drop(before["score"], no_ft["score"] if no_ft else after["score"])
    comparison["drop_without_finetune"] = {"predicted": predicted["drop"], "measured": drop}
    budgets = []
    for b in plan.data["objective"]["budgets"]:
        value = measured_costs.get(b["metric"])
        if value is not None and b["metric"] in (latency or {}) and b.get("kind") == "fraction":
            # a fraction of the original's latency: against the original measured in the same run
            value = value / (latency or {})[b["metric"]]["original"] * float(plan.data["original"][b["metric"]])
        met = None if value is None else value <= b["absolute"] * (1 + 1e-6)
        budgets.append({**b, "measured": value, "met": met,
                        **({"note": _unmeasured(plan, b["metric"])} if value is None else {})})
    return comparison, budgets


def missed_budgets(metrics: Mapping[str, Any]) -> list[str]:
    """Human-readable lines for every budget the measured model missed (a budget given as a
    fraction of the original: as fractions)."""
    lines = []
    for b in metrics.get("budgets", []):
        if b.get("met") is not False:
            continue
        if b.get("kind") == "fraction" and b.get("absolute") and b.get("value") is not None:
            measured = float(b["measured"]) / float(b["absolute"]) * float(b["value"])
            lines.append(f"{b['metric']}: measured {measured:.4g} of the original > budget {float(b['value']):.4g}")
        else:
            lines.append(f"{b['metric']}: measured {b['measured']:.6g} > budget {b['absolute']:.6g}")
    return lines


def measure_original(model: nn.Module, data: EvalSet, model_spec: ModelSpec | None, *,
                     timing: bool = True, task: Task | None = None, task_state: Any = None) -> dict[str, Any]:
    """The uncompressed model measured the same way (its file: the same container, all float)."""
    t = task or get_task("classification")
    state = task_state if task_state is not None else t.prepare(model, data)
    cm = CompressedModel(model, [], model_spec=model_spec, original_digest=architecture_digest(model),
                         input_shape=tuple(data.example_input.shape[1:]))
    file_bytes, payload_bytes = cm.sizes()
    m = measure(model, data, file_bytes, timing=timing, task=t, task_state=state)
    m["payload_bytes"] = payload_bytes
    return m
