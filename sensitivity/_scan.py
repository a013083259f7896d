"""The sensitivity scan: compress one unit at a time with each method and setting, evaluate, restore.

The methods (:mod:`sensplan.sensitivity.methods`) say which units they apply to and how to probe
them; the task (:mod:`sensplan.sensitivity.tasks`) says how to score the model. Each probe is
reversible: after :func:`scan` the model's state dict is bit-identical to before. A ``drop`` is
positive when the model got worse (``Metric.drop``); ``loss_increase`` is probe loss - baseline loss.

Every finished probe is appended to a journal (``<out>.journal``) when one is given, so a killed
scan re-run with the same command redoes no finished probe (see :mod:`sensplan._journal`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sensplan._artifacts import now_iso, versions, weights_record
from sensplan._effects import to_data as effect_data
from sensplan._errors import UserInputError, first_line
from sensplan._metric import FISHER, Metric
from sensplan._tables import SCAN_FORMAT, SCAN_SCHEMA_VERSION, Scan
from sensplan.sensitivity._data import EvalSet, check_classes_fit
from sensplan.sensitivity._eval import (
    batchnorm_state_restored,
    batchnorm_statistics,
    channels_last_wins,
    device_of,
    recalibrate_batchnorm_,
)
from sensplan.sensitivity._fisher import ProbeEstimator, fisher_diagonal
from sensplan.sensitivity._groups import PruningGraph, channel_graph, count_macs, layer_weight_key
from sensplan.sensitivity._models import ModelSpec, architecture_digest, weights_digest
from sensplan.sensitivity._prefix import CachedModel, PrefixCache
from sensplan.sensitivity.methods import (
    METHODS,
    Method,
    MethodContext,
    Setting,
    all_methods,
    compatible,
    execution_order,
    get_method,
)
from sensplan.sensitivity.tasks import TASKS, Task, TaskResult, get_task, paired_se, signal_changes


def default_settings() -> dict[str, tuple[Setting, ...]]:
    """The methods ``sensplan scan`` runs without ``--methods``, with their default settings."""
    return {m.name: tuple(m.default_settings) for m in all_methods() if m.default_on}


@dataclass(frozen=True)
class ScanConfig:
    """What to scan: ``settings`` maps a method name to its settings; the ``task`` scores the model.

    Example: ``ScanConfig({"prune": [{"ratio": 0.25}], "weight_quant": [{"bits": 4}]})``;
    ``ScanConfig.of(bits=(8, 4), ratios=(0.25, 0.5))`` is the same for the two default methods.
    """

    settings: Mapping[str, Sequence[Setting]] = field(default_factory=default_settings)
    task: str = "classification"
    batch_size: int = 500
    check_samples: int = 8
    #: estimate every probe that only changes parameter values from the Fisher information instead
    #: of measuring it (``scan --fast``; see ``_fisher``); ``fast_measured`` of them are measured to
    #: map the estimate to the task's drop, from ``fast_samples`` calibration inputs
    fast: bool = False
    fast_measured: int = 8
    fast_samples: int = 512
    #: the memory (MiB) for the activations the prefix cache keeps per batch (``scan --cache-mb``;
    #: beyond it they go to a temporary folder; 0 turns the cache off). See ``_prefix``.
    cache_mb: float = 2048
    #: scan only the units whose name (or a group's label, e.g. "layer 3 heads") matches one of
    #: these shell-style patterns (``scan --units``); empty: every unit. The others are skipped with
    #: the reason, so a plan leaves them as they are.
    units: tuple[str, ...] = ()
    #: keep each pruned channel group's width a multiple of this (``scan --round-to``: 8 or 16 suit
    #: the blocked convolution kernels of ONNX Runtime and oneDNN); 1: any width. Not for groups of
    #: attention heads, whose unit is a head.
    round_to: int = 1

    def __post_init__(self) -> None:
        norm: dict[str, tuple[Setting, ...]] = {}
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise UserInputError(f"round_to must be a positive integer (1: any width). Got {self.round_to!r}.")
        if isinstance(self.units, str) or not all(isinstance(u, str) and u for u in self.units):
            raise UserInputError(f"units must be a sequence of non-empty name patterns, e.g. "
                                 f"('*.mlp.*', 'layer 0 heads'). Got {self.units!r}.")
        object.__setattr__(self, "units", tuple(self.units))
        if not self.settings:
            raise UserInputError("The scan has no method to run. Give at least one, e.g. "
                                 "--methods prune,weight_quant.")
        for name, settings in self.settings.items():
            method = get_method(name)
            try:
                checked = [method.check_setting(s) for s in settings]
            except (ValueError, KeyError, TypeError) as e:
                raise UserInputError(f"Bad setting for {name}: {e}") from None
            if not checked:
                raise UserInputError(f"The method {name!r} has no settings to scan. Give at least one.")
            unique = {_setting_key(s): s for s in checked}
            norm[name] = tuple(sorted(unique.values(), key=method.level))
        object.__setattr__(self, "settings", norm)
        get_task(self.task)
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise UserInputError(f"The batch size must be a positive integer (--batch-size). Got "
                                 f"{self.batch_size!r} instead.")
        if not isinstance(self.check_samples, int) or self.check_samples <= 0:
            raise UserInputError(f"check_samples must be a positive integer. Got {self.check_samples!r}.")
        if not isinstance(self.fast_measured, int) or self.fast_measured < 2:
            raise UserInputError(f"--fast-measured must be >= 2 (the map from the estimate to the drop needs "
                                 f"at least two measured probes). Got {self.fast_measured!r}.")
        if isinstance(self.cache_mb, bool) or not isinstance(self.cache_mb, (int, float)) or not self.cache_mb >= 0:
            raise UserInputError(f"--cache-mb must be a number of MiB >= 0 (0 turns the prefix cache off). Got "
                                 f"{self.cache_mb!r} instead.")
        if not isinstance(self.fast_samples, int) or self.fast_samples <= 0:
            raise UserInputError(f"fast_samples must be a positive integer. Got {self.fast_samples!r}.")
        if self.fast and "kl" not in get_task(self.task).signals:
            raise UserInputError(f"--fast estimates the KL divergence from the original's outputs, which the task "
                                 f"{self.task!r} does not record. Use --task classification or agreement, or scan "
                                 f"without --fast.")

    @classmethod
    def of(cls, *, bits: Sequence[int] = (8, 6, 4, 3, 2),
           ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
           prune: bool = True, quantize: bool = True, **kwargs: Any) -> ScanConfig:
        """The two default methods with these weight ``bits`` and pruning ``ratios``."""
        settings: dict[str, list[Setting]] = {}
        if prune and ratios:
            settings["prune"] = [{"ratio": float(r)} for r in ratios]
        if quantize and bits:
            settings["weight_quant"] = [{"bits": int(b)} for b in bits]
        return cls(settings, **kwargs)

    @classmethod
    def defaults(cls, methods: Sequence[str] | None = None, **kwargs: Any) -> ScanConfig:
        """``methods`` (names; default: those ``sensplan scan`` runs without ``--methods``), each with
        its default settings, e.g. ``ScanConfig.defaults(["prune", "weight_quant", "act_quant"])``."""
        if methods is None:
            return cls(dict(default_settings()), **kwargs)
        return cls({m: tuple(get_method(m).default_settings) for m in methods}, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": {k: [dict(s) for s in v] for k, v in self.settings.items()},
                "task": self.task, "batch_size": self.batch_size, "check_samples": self.check_samples,
                **({"fast": True, "fast_measured": self.fast_measured, "fast_samples": self.fast_samples}
                   if self.fast else {}), **({"units": list(self.units)} if self.units else {}),
                **({"round_to": self.round_to} if self.round_to > 1 else {})}

    def selects(self, unit: str, label: str = "") -> bool:
        """Whether ``units`` lets the scan probe ``unit`` (a group also by its ``label``)."""
        return not self.units or _selects(self.units, unit, label)


def _selects(patterns: Sequence[str], unit: str, label: str = "") -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(unit, p) or bool(label and fnmatch.fnmatchcase(label, p)) for p in patterns)


def _setting_key(setting: Mapping[str, Any]) -> str:
    return json.dumps(dict(setting), sort_keys=True, separators=(",", ":"))


class _Progress:
    """tqdm on a terminal; a line every ``every`` seconds when stderr is a file or a pipe."""

    def __init__(self, total: int, enabled: bool | None, every: float = 30.0) -> None:
        from tqdm.auto import tqdm

        self.total, self.done, self.every = total, 0, every
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.quiet = enabled is False
        self.bar = tqdm(total=total, desc="scan", unit="probe", dynamic_ncols=True, leave=True,
                        disable=not self.tty)
        self.t0 = self.last = time.perf_counter()

    def update(self, what: str) -> None:
        self.done += 1
        self.bar.set_postfix_str(what, refresh=False)
        self.bar.update(1)
        now = time.perf_counter()
        if not self.tty and not self.quiet and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            rate = self.done / max(1e-9, now - self.t0)
            eta = (self.total - self.done) / max(1e-9, rate)
            print(f"scan: {self.done}/{self.total} probes, {now - self.t0:.0f} s, about {eta:.0f} s "
                  f"left ({what})", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def tied_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """State-dict keys whose tensor is the same memory as an earlier key's (a tied weight, such as
    a language model's head and its token embeddings), mapped to that earlier key."""
    seen: dict[tuple[Any, ...], str] = {}
    out: dict[str, str] = {}
    for k, v in state.items():
        if v.numel() == 0:
            continue
        sig = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()),
               v.dtype)
        if sig in seen:
            out[k] = seen[sig]
        else:
            seen[sig] = k
    return out


def describe_model(model: nn.Module, example_input: torch.Tensor) -> tuple[
        dict[str, Any], dict[str, Any], PruningGraph | None, str]:
    """The static structure the cost model needs: layers and tensors; plus the channel-group graph
    (None with the reason when Torch-Pruning cannot trace the model). A model may name layers to
    leave out of the scan with a method ``out_of_scope() -> {layer: reason}`` (a Hugging Face
    model's output head); they get ``out_of_scope`` in ``layers``."""
    macs = count_macs(model, example_input)
    layers: dict[str, Any] = {}
    state = model.state_dict()
    hook = getattr(model, "out_of_scope", None)
    scope: dict[str, str] = hook() if callable(hook) else {}
    for name, mod in model.named_modules():
        key = layer_weight_key(name, mod)
        if name in macs and key is not None and key in state:
            layers[name] = {"type": type(mod).__name__, "weight": key,
                            "weight_shape": list(state[key].shape), "macs": int(macs[name]),
                            "bias": getattr(mod, "bias", None) is not None,
                            **({"out_of_scope": scope[name]} if name in scope else {})}
    weight_of = {v["weight"]: k for k, v in layers.items()}
    params = {n for n, _ in model.named_parameters()}
    tensors = {k: {"shape": list(v.shape), "storage_bits": v.element_size() * 8,
                   "kind": "parameter" if k in params else "buffer",
                   "layer": weight_of.get(k), "shrinks": {}}
               for k, v in state.items()}
    for k, first in tied_tensors(state).items():  # e.g. an LM head tied to the embeddings: stored once
        tensors[k]["tied_to"] = first
        layer = weight_of.get(k)
        if layer is not None and not layers[layer].get("out_of_scope"):
            layers[layer]["out_of_scope"] = (f"its weight is the same memory as {first} (tied): compressing "
                                             f"it would change that tensor too")
    try:
        graph: PruningGraph | None = channel_graph(model, example_input)
        error = ""
    except Exception as e:  # Torch-Pruning cannot trace every model; quantization goes on
        graph = None
        first = first_line(e)
        error = (f"Torch-Pruning could not build the channel dependency graph "
                 f"({type(e).__name__}: {first}); channel pruning is unavailable for this model.")
    return layers, tensors, graph, error


def scan(model: nn.Module, data: EvalSet, config: ScanConfig | None = None, *,
         calib: EvalSet | None = None, model_spec: ModelSpec | None = None, weights: str | None = None,
         progress: bool | None = None, journal: str | os.PathLike[str] | None = None,
         resume: bool = True, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, workers: int = 1, ray: str | None = None) -> Scan:
    """Measure the drop of every (unit, method, setting) on ``data``; return the table (unsaved).

    With ``calib`` (calibration data, ideally disjoint from ``data``), every probe recalibrates the
    BatchNorm statistics as the executor will before evaluating. With ``journal`` (a path), every
    finished probe is appended there and, with ``resume``, probes already in it are not redone.
    ``device`` runs the scan there (on a copy of the model when it is not already there). ``model``
    is restored after every probe: its state dict is bit-identical afterwards. ``workers`` > 1
    measures the probes on that many local processes; ``ray`` (an address, or "" for a Ray started
    on this machine) on Ray actors instead (see ``_workers``). Example::

        table = scan(model, load_eval_set(DataSpec.parse("digits")), ScanConfig.of(bits=(8, 4)))
        table.save("scan.json")
    """
    cfg = config or ScanConfig()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserInputError(f"--workers must be a whole number >= 1. Got {workers!r} instead.")
    task = get_task(cfg.task)
    dev = torch.device(device) if device is not None else device_of(model)
    started, t0 = now_iso(), time.perf_counter()
    if dev != device_of(model):
        model = copy.deepcopy(model).to(dev)
    data_dev, calib_dev = data.to(dev), calib.to(dev) if calib is not None else None
    was_training = model.training
    model.eval()
    check_model_and_data(model, data_dev, task, dev, dtype)
    # inputs in the memory order the model runs fastest on (timed; see channels_last_wins)
    channels_last = channels_last_wins(model, data_dev.x, cfg.batch_size, dtype)
    data_dev = data_dev.in_layout(channels_last)
    calib_dev = calib_dev.in_layout(channels_last) if calib_dev is not None else None
    spread_out = workers > 1 or ray is not None
    # with workers, this process only orders the probes: each worker has a cache of its own
    cache = _prefix_cache(model, data_dev, calib_dev, cfg, order_only=spread_out)
    # the task's reference and the baseline run the same forward pass: once, through the cache
    runs = CachedModel(model, cache) if cache.active and not spread_out else model
    with cache.unchanged(), TASKS.failures(task.name, "prepare or evaluate on the original model"):
        state = task.prepare(runs, data_dev, cfg.batch_size, dev, dtype)
        base = task.evaluate(runs, data_dev, state, cfg.batch_size, dev, dtype)
    problem = task.check_baseline(base, data_dev)
    if not math.isfinite(float(base.score)):
        problem = (f"The task {task.name!r} scores the original model {base.score}: every drop would be "
                   f"undefined. " + ("Fix the task (its evaluate)." if TASKS.origin(task.name) not in ("", "built-in")
                                     else "Check the model's outputs on --data (they may not be finite)."))
    if problem:
        cache.close()
        model.train(was_training)
        raise UserInputError(problem)
    ctx = _scan_context(model, data_dev, calib_dev, cfg, dev)
    reference = batchnorm_statistics(model, calib_dev) if calib_dev is not None else {}
    header = _journal_header(model, data, calib if reference else None, cfg, weights, dtype)
    methods_info, todo = _probes_to_run(ctx, cfg)
    prober, cache = measuring(ctx, task, state, base, cfg, reference, dtype, cache=cache)
    estimator = runner = None
    spread: dict[str, Any] | None = None
    spill_root = None
    if cfg.fast:
        fisher = fisher_diagonal(model, ctx.calibration_inputs(cfg.fast_samples), seed=0)
        estimator = ProbeEstimator(model, fisher)
    try:
        if spread_out:
            import tempfile

            from sensplan.sensitivity import _workers

            # local workers spill into a folder of this process's, removed at the end whatever they did
            spill_root = None if ray is not None else tempfile.mkdtemp(prefix="sensplan-workers-")
            pinned = device is not None and torch.device(device).index is not None
            p = _workers.payload(model, model_spec, data, calib if reference else None, cfg, base,
                                 dev if pinned or dev.type != "cuda" else torch.device("cuda"), dtype,
                                 _workers.threads_per_worker(workers), todo, spill_root, channels_last)
            runner = _workers.RayRunner(p, workers, ray or None) if ray is not None else \
                _workers.ProcessRunner(p, workers)
        results = _run_probes(ctx, todo, _open_journal(journal, header, resume), progress, prober,
                              estimator, cfg.fast_measured, runner)
    finally:
        if runner is not None:
            spread = _workers.describe(runner, workers, ray)
            runner.close()
        if spill_root is not None:
            import shutil

            shutil.rmtree(spill_root, ignore_errors=True)
        cache.close()
        model.train(was_training)
    return Scan({
        "format": SCAN_FORMAT,
        "schema_version": SCAN_SCHEMA_VERSION,
        "provenance": {"started": started, "seconds": round(time.perf_counter() - t0, 3),
                       "versions": versions(), "torch_threads": torch.get_num_threads(),
                       "device": str(dev), "dtype": str(dtype or torch.float32).replace("torch.", ""),
                       "input_layout": "channels_last" if channels_last else "contiguous",
                       "journal": str(journal) if journal else None,
                       "probes_from_journal": sum(1 for r in results if r.get("from_journal")),
                       **({"probes_estimated": sum(1 for r in results if r.get("estimated"))} if cfg.fast else {}),
                       "prefix_cache": cache.record(), **({"workers": spread} if spread else {})},
        "model": _model_record(model, ctx.example_input, model_spec, weights, header),
        "data": data.description,
        "task": task.to_dict(),
        "config": {**cfg.to_dict(), "bn_recalibration": bool(reference)},
        "calibration": calib.description if calib is not None and reference else None,
        "baseline": base.to_dict(),
        "methods": methods_info,
        "pruning_graph": {"available": ctx.graph is not None, "reason": ctx.graph_error},
        "layers": ctx.layers,
        "groups": ctx.groups,
        "tensors": ctx.tensors,
        "results": [{k: v for k, v in r.items() if k != "from_journal"} for r in results],
    })


def _scan_context(model: nn.Module, data: EvalSet, calib: EvalSet | None, cfg: ScanConfig,
                  dev: torch.device) -> MethodContext:
    """The structure the methods scan (layers, tensors, channel groups) and the data they use."""
    example = data.example_input
    layers, tensors, graph, graph_error = describe_model(model, example)
    groups = ({gid: {"channels": graph.channels(gid), "channel_step": graph.channel_step(gid),
                     "members": [[m.module, m.side, m.kind] for m in graph.members(gid)],
                     **(graph.describe(gid) if hasattr(graph, "describe") else {}),
                     "status": "skipped", "reason": "no group method was scanned."}
               for gid in graph.group_ids()} if graph is not None else {})
    for info in groups.values():
        if cfg.round_to > 1 and info.get("kind") != "heads":
            info["round_to"] = cfg.round_to
    return MethodContext(model, example, layers, groups, tensors, calib=calib, eval_data=data,
                         check_inputs=data.x[: cfg.check_samples], graph=graph,
                         graph_error=graph_error, device=dev)


def _probes_to_run(ctx: MethodContext, cfg: ScanConfig) -> tuple[dict[str, Any], list[tuple[Method, str, Setting]]]:
    """Every method's units (or why each is skipped) and the probes to run, in config order.

    Units are found in stage order, so that a group method has recorded which tensors shrink with
    which group before a later method looks at them."""
    methods = {name: get_method(name) for name in cfg.settings}
    units_of: dict[str, dict[str, str]] = {}
    for pattern in cfg.units:
        if not any(_selects((pattern,), u, str(g.get("label", "")))
                   for u, g in [*((k, {}) for k in ctx.layers), *ctx.groups.items()]):
            examples = ", ".join([*list(ctx.layers)[:2], *(str(g.get("label") or k) for k, g in
                                                            list(ctx.groups.items())[:1])])
            raise UserInputError(f"--units {pattern!r} matches no unit of the model. Unit names look like "
                                 f"{examples}: e.g. --units '*layers.0.*'.")
    for name in sorted(methods, key=lambda n: execution_order(methods[n])):
        method = methods[name]
        # with --units, a method sees only the selected units (no safety check of the others)
        shown = ctx if not cfg.units else dataclasses.replace(
            ctx, layers={k: v for k, v in ctx.layers.items() if cfg.selects(k)},
            groups={k: v for k, v in ctx.groups.items() if cfg.selects(k, str(v.get("label", "")))})
        units_of[name] = {} if method.unit_kind == "group" and ctx.graph is None else \
            method.units(shown, cfg.settings[name])
        if cfg.units and not (method.unit_kind == "group" and ctx.graph is None):
            every = ctx.groups if method.unit_kind == "group" else ctx.layers
            units_of[name].update({u: "not selected by --units" for u in every if u not in units_of[name]})
        if method.unit_kind == "layer":  # layers the model leaves out of scope (an output head)
            units_of[name].update({u: ctx.layers[u]["out_of_scope"] for u in units_of[name]
                                   if ctx.layers.get(u, {}).get("out_of_scope")})
        if method.unit_kind == "group":
            for gid, why in units_of[name].items():
                ctx.groups[gid].update(status="skipped" if why else "scanned", reason=why)
    info: dict[str, Any] = {}
    todo: list[tuple[Method, str, Setting]] = []
    for name, settings in cfg.settings.items():
        method, units = methods[name], units_of[name]
        info[name] = {**method.describe(), "settings": [dict(s) for s in settings],
                      "skipped": {u: why for u, why in units.items() if why},
                      "incompatible_with": sorted(o for o in methods if o != name
                                                  and methods[o].unit_kind == method.unit_kind
                                                  and methods[o].axis != method.axis
                                                  and not compatible(method, methods[o])),
                      **({"unavailable": ctx.graph_error} if method.unit_kind == "group" and ctx.graph is None
                         else {})}
        for unit, why in units.items():
            if not why:
                todo.extend((method, unit, s) for s in method.unit_settings(ctx, unit, settings))
    return info, todo


def _prefix_cache(model: nn.Module, data: EvalSet, calib: EvalSet | None, cfg: ScanConfig, *,
                  order_only: bool = False, spill_root: str | None = None) -> PrefixCache:
    return PrefixCache(model, [data.x] + ([calib.x] if calib is not None else []), data.x[: cfg.check_samples],
                       cfg.cache_mb, order_only=order_only, spill_root=spill_root)


def measuring(ctx: MethodContext, task: Task, state: Any, base: TaskResult, cfg: ScanConfig, reference: Any,
              dtype: torch.dtype | None, *, cache: PrefixCache | None = None, spill_root: str | None = None
              ) -> tuple[Prober, PrefixCache]:
    """The prober of a scan (or of one of its workers): the task evaluates the model through its
    prefix ``cache`` (built here when None), on ``ctx``'s data; rows are computed against ``base``."""
    data, calib, dev = ctx.eval_data, ctx.calib, ctx.device
    if data is None:  # pragma: no cover - a scan's context always has its data
        raise ValueError("no evaluation data")
    if cache is None:
        cache = _prefix_cache(ctx.model, data, calib, cfg, spill_root=spill_root)
    order_only = cache.order_only
    cached = CachedModel(ctx.model, cache) if cache.active and not order_only else ctx.model
    prober = Prober(ctx, lambda: task.evaluate(cached, data, state, cfg.batch_size, dev, dtype),
                    lambda ev, method, unit, setting, seconds: _row(
                        task.metric, base, ev, method, ctx, unit, setting, seconds),
                    calib, reference, cache)
    return prober, cache


class Prober:
    """Measures one probe in this process: perturb, recalibrate BatchNorm (against ``reference``,
    on ``calib``), evaluate with the task, restore; through the prefix ``cache`` when it is on (a
    cache that only orders probes, ``order_only``, orders them and runs nothing)."""

    def __init__(self, ctx: MethodContext, evaluate: Any, row_of: Any, calib: EvalSet | None, reference: Any,
                 cache: PrefixCache | None = None) -> None:
        self.ctx, self.evaluate, self.row_of = ctx, evaluate, row_of
        self.calib, self.reference = calib, reference
        #: the cache whose trace orders the probes, and the one probes run through
        self.orderer = cache if cache is not None and cache.active else None
        self.cache = self.orderer if self.orderer is not None and not self.orderer.order_only else None

    def measure(self, method: Method, unit: str, setting: Setting) -> dict[str, Any]:
        t = time.perf_counter()
        cache = self.cache
        with METHODS.failures(method.name, f"its probe of {unit} (or the run of the model it perturbed)"):
            with method.probe(self.ctx, unit, setting), batchnorm_state_restored(self.ctx.model), \
                    cache.probing() if cache is not None else nullcontext():
                recalibrate_batchnorm_(self.ctx.model, self.calib, self.reference,
                                       forward=cache.forward if cache is not None else None)
                ev = self.evaluate()
        with METHODS.failures(method.name, "effect"):
            return self.row_of(ev, method, unit, setting, time.perf_counter() - t)  # type: ignore[no-any-return]

    def order(self, todo: Sequence[tuple[Method, str, Setting]], indices: Sequence[int]) -> list[int]:
        """``indices`` (into ``todo``) in the order of where the probes cut the model."""
        if self.orderer is None:
            return list(indices)
        cache = self.orderer
        return sorted(indices, key=lambda i: cache.position(_unit_modules(self.ctx, todo[i][0], todo[i][1])))

    def run(self, todo: Sequence[tuple[Method, str, Setting]], indices: Sequence[int]
            ) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in indices:
            yield i, self.measure(*todo[i])


def _run_probes(ctx: MethodContext, todo: Sequence[tuple[Method, str, Setting]], jr: Any, progress: bool | None,
                prober: Prober, estimator: ProbeEstimator | None = None, map_points: int = 0,
                runner: Any = None) -> list[dict[str, Any]]:
    """Probe every (method, unit, setting): perturb, recalibrate BatchNorm, evaluate, restore;
    rows already in the journal are taken from it, new ones appended to it. Probes run in the
    order of where they cut the model (the prefix cache's reuse; see ``_prefix``), rows come back
    in ``todo``'s order. ``runner`` measures them elsewhere (``scan --workers``; see ``_workers``):
    ``runner.run(indices)`` yields ``(index, row)`` as they finish; by default ``prober`` does.

    With an ``estimator`` (``scan --fast``), a probe that only changes parameter values is estimated
    instead of evaluated (see ``_fisher``), and then ``map_points`` of the estimated probes, spread
    over the estimate's range, are measured too: the planner maps the estimate to the task's drop
    through them. A measured probe records its measured KL divergence as its estimate."""
    rows: list[dict[str, Any] | None] = [None] * len(todo)
    bar = _Progress(len(todo) + (map_points if estimator is not None else 0), progress)

    def measured(indices: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        ordered = prober.order(todo, indices)
        return runner.run(ordered) if runner is not None else prober.run(todo, ordered)  # type: ignore[no-any-return]

    try:
        pending: list[int] = []
        for i, (method, unit, setting) in enumerate(todo):
            row = jr.get(unit, method.name, setting) if jr is not None else None
            if row is not None and "family" not in row and method.family(setting):
                row = {**row, "family": method.family(setting)}  # journaled before rows had it
            if row is None and estimator is not None and method.values_only:
                t = time.perf_counter()
                with method.probe(ctx, unit, setting):
                    estimate = estimator.estimate()
                if estimate is not None:
                    row = estimated_row(method, ctx, unit, setting, estimate, time.perf_counter() - t)
                    if jr is not None:
                        jr.append(unit, method.name, setting, row)
            if row is None:
                pending.append(i)
                continue
            rows[i] = row
            bar.update(f"{method.label(setting)} {unit}")
        for i, row in measured(pending):
            method, unit, setting = todo[i]
            if estimator is not None:
                row = _with_measured_estimate(row)
            if jr is not None:
                jr.append(unit, method.name, setting, row)
            rows[i] = row
            bar.update(f"{method.label(setting)} {unit}")
        results = [r for r in rows if r is not None]
        if estimator is not None:
            for i, row in measured(_map_points(results, map_points)):
                method, unit, setting = todo[i]
                r = results[i]
                row = {**row, "signals": {**(row.get("signals") or {}), FISHER: r["signals"][FISHER]},
                       "map_point": True}
                if jr is not None:
                    jr.append(unit, method.name, setting, row)
                results[i] = row
                bar.update(f"map {method.label(setting)} {unit}")
    finally:
        bar.close()
        if jr is not None:
            jr.close()
    return results


def _unit_modules(ctx: MethodContext, method: Method, unit: str) -> list[str]:
    """The modules a probe of ``unit`` probably changes (to order probes by where they cut)."""
    if method.unit_kind == "group":
        return [str(m[0]) for m in ctx.groups.get(unit, {}).get("members", [])]
    return [unit]


def _with_measured_estimate(row: dict[str, Any]) -> dict[str, Any]:
    """A measured row of a fast scan: its measured KL divergence stands for the Fisher estimate (the
    quantity the estimate approximates), so that the planner adds up one signal over all units."""
    signals = dict(row.get("signals") or {})
    if "kl" in signals:
        signals[FISHER] = {**signals["kl"], "measured": "kl"}
    return {**row, "signals": signals}


def _map_points(results: Sequence[Mapping[str, Any]], k: int) -> list[int]:
    """Which estimated rows to measure so that ``k`` rows map the estimate to the drop (those
    measured in an earlier run of the scan count): spread evenly over the logarithm of the estimate,
    from its 10th percentile to its largest value, each the nearest not yet taken."""
    have = sum(1 for r in results if r.get("map_point"))
    rows = [(float(r["signals"][FISHER]["value"]), i) for i, r in enumerate(results)
            if r.get("estimated") and float(r["signals"][FISHER]["value"]) > 0]
    need = min(k - have, len(rows))
    if need <= 0:
        return []
    rows.sort()
    logs = [math.log(v) for v, _ in rows]
    lo, hi = logs[int(0.1 * (len(logs) - 1))], logs[-1]
    chosen: list[int] = []
    free = list(range(len(rows)))
    for j in range(need):
        target = hi if need == 1 else lo + (hi - lo) * j / (need - 1)
        best = min(free, key=lambda a: abs(logs[a] - target))
        free.remove(best)
        chosen.append(rows[best][1])
    return sorted(chosen)


def _model_record(model: nn.Module, example: torch.Tensor, model_spec: ModelSpec | None, weights: str | None,
                  header: Mapping[str, Any]) -> dict[str, Any]:
    return {"spec": model_spec.to_dict() if model_spec else None,
            **weights_record(weights),
            "weights_digest": header["weights_digest"],  # of the values, whatever the file
            "architecture_digest": architecture_digest(model),
            "input_shape": list(example.shape[1:]),
            "outputs": int(_outputs(model, example)),
            # MoE experts split out of a fused module (see _moe): their layers exist only in sensplan's model
            **({"split_experts": [f"model.{n}" for n in getattr(model, "experts")]}  # noqa: B009
               if _names(getattr(model, "experts", None)) else {})}


def _names(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(n, str) for n in v)


def _row(metric: Metric, base: TaskResult, ev: TaskResult, method: Method, ctx: MethodContext, unit: str,
         setting: Setting, seconds: float) -> dict[str, Any]:
    if not math.isfinite(float(ev.score)):  # a row without a drop would make the scan unplannable
        raise UserInputError(f"The probe {method.label(setting)} of {unit} scored {ev.score} ({metric.name}; the "
                             f"original {base.score:.4g}): a drop must be a finite number. Either the task's "
                             f"evaluate (a plug-in task: fix it) or the compressed model's outputs (not finite: scan "
                             f"without this setting, e.g. --setting {method.name}=...) give it; the journal keeps no "
                             f"row for it.")
    lost = gained = 0
    se = 0.0
    if base.per_sample is not None and ev.per_sample is not None:
        # lost/gained count samples that got worse/better whatever the metric's direction
        lost, gained, se = paired_se(base.per_sample, ev.per_sample)
        if not metric.higher_is_better:
            lost, gained = gained, lost
    return {"unit": unit, "method": method.name, "axis": method.axis, "setting": dict(setting),
            "label": method.label(setting), "level": method.level(setting),
            **({"family": method.family(setting)} if method.family(setting) else {}),
            "effect": effect_data(method.effect(setting, ctx.unit_info(unit, method.unit_kind))),
            "score": ev.score, "loss": ev.loss,
            "drop": metric.drop(base.score, ev.score), "drop_se": se, "lost": lost, "gained": gained,
            "loss_increase": ev.loss - base.loss, "signals": signal_changes(base, ev),
            "seconds": round(seconds, 4)}


def estimated_row(method: Method, ctx: MethodContext, unit: str, setting: Setting,
                  estimate: tuple[float, float], seconds: float) -> dict[str, Any]:
    """The row of a probe that ``scan --fast`` estimated instead of measuring: no drop, score or
    loss (null), ``estimated: true``, and the Fisher estimate of the KL divergence as its signal."""
    value, se = estimate
    return {"unit": unit, "method": method.name, "axis": method.axis, "setting": dict(setting),
            "label": method.label(setting), "level": method.level(setting),
            **({"family": method.family(setting)} if method.family(setting) else {}),
            "effect": effect_data(method.effect(setting, ctx.unit_info(unit, method.unit_kind))),
            "score": None, "loss": None, "drop": None, "drop_se": None, "lost": None, "gained": None,
            "loss_increase": None, "signals": {FISHER: {"value": value, "se": se}}, "estimated": True,
            "seconds": round(seconds, 4)}


def check_model_and_data(model: nn.Module, data: EvalSet, task: Task,
                         device: torch.device | None = None, dtype: torch.dtype | None = None) -> int | None:
    """Check, on two samples, that ``model`` runs on ``data`` and, for a task scored against class
    labels, that the data's classes are the model's outputs. Returns the number of outputs (None
    when the output is not a (batch, classes) tensor: a task of another kind runs its model itself).
    A mismatch is a UserInputError naming the flags that fix it."""
    from contextlib import nullcontext

    _check_labels(task, data, model)
    dev = device or device_of(model)
    x = data.x[: min(2, len(data))].to(dev)
    fp16 = dtype is not None and dtype != torch.float32
    try:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype) if fp16 else nullcontext():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - the user's model on the user's data
        first = first_line(e, 300)
        raise UserInputError(
            f"The model cannot run on the data (inputs of shape {tuple(data.x.shape[1:])}): "
            f"{type(e).__name__}: {first}. Check that --data fits the model: its channels (e.g. "
            f"--model-arg in_channels=...), the image size (--resize, --crop) and "
            f"--mean/--std.") from e
    if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise UserInputError(
            "The model's outputs on the data are not finite (NaN or infinity), so every probe would "
            "measure nothing. Its weights are probably broken: check --weights (a checkpoint with NaN "
            "values, or one saved after training diverged).")
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return None
    n_outputs = int(out.shape[1])
    if task.needs_labels and data.y.dim() == 1:  # class indices
        check_classes_fit(data.classes, data.description, n_outputs)
    return n_outputs


def _check_labels(task: Task, data: EvalSet, model: nn.Module) -> None:
    if not (task.needs_labels and bool((data.y < 0).any())):
        return
    kind = getattr(model, "kind", None)  # a Hugging Face model's (sensitivity/_hf.py)
    what = "text with no labels" if data.description.get("tokenizer") else "an unlabelled image folder"
    fix = {"causal-lm": "For a language model use --task perplexity (the next-token loss) or --task agreement "
                        "(the original's top next token kept)",
           "embedding": "For an embedding model use --task embedding (cosine similarity to the original's "
                        "embeddings)"}.get(str(kind), "Use --task agreement, which compares with the original "
                                                      "model instead")
    raise UserInputError(f"The task {task.name!r} needs labels, but the data has none ({what}). {fix}.")


def _journal_header(model: nn.Module, data: EvalSet, calib: EvalSet | None, cfg: ScanConfig,
                    weights: str | None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    return {"architecture_digest": architecture_digest(model), "weights_digest": weights_digest(model),
            "data": data.source_digest(), "calibration": calib.source_digest() if calib is not None else None,
            "task": cfg.task,
            "batch_size": cfg.batch_size,
            # a fast scan's rows are estimates: a full scan must not take them from its journal
            **({"fast": [cfg.fast_samples, cfg.fast_measured]} if cfg.fast else {}),
            # BatchNorm statistics fold a last calibration batch of one sample into the one before
            # (since 2026-11-25): only a calibration count of 256k+1 measures differently than before
            **({"calibration_batches": "last-single-folded"}
               if calib is not None and len(calib) % 256 == 1 and len(calib) > 1 else {}),
            # rows measured under autocast differ from float32 ones; float32 journals keep matching
            **({"dtype": str(dtype).replace("torch.", "")} if dtype not in (None, torch.float32) else {})}


def _open_journal(path: str | os.PathLike[str] | None, header: dict[str, Any], resume: bool) -> Any:
    if path is None:
        return None
    from sensplan._journal import Journal

    return _MarkingJournal(Journal.open(path, header, resume=resume))


class _MarkingJournal:
    """Marks rows read back from the journal (for the provenance count)."""

    def __init__(self, jr: Any) -> None:
        self.jr = jr

    def get(self, unit: str, method: str, setting: Setting) -> dict[str, Any] | None:
        row = self.jr.get(unit, method, setting)
        return None if row is None else {**row, "from_journal": True}

    def append(self, unit: str, method: str, setting: Setting, row: dict[str, Any]) -> None:
        self.jr.append(unit, method, setting, row)

    def close(self) -> None:
        self.jr.close()




def _outputs(model: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(example).shape[-1])
