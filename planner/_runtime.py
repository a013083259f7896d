"""Runtimes: where a compressed model really runs, and honest timing of it.

``torch`` is eager PyTorch (what the scan measured). ``onnxruntime`` exports the model to ONNX
(pruned shapes are real: the exporter sees the smaller tensors), and turns the layers the plan gives
8-bit integer weights *and* 8-bit integer activations into QDQ nodes with onnxruntime's own
quantization tooling (``quantize_static``), so that ONNX Runtime fuses them into its integer kernels
(QLinearConv, QLinearMatMul). Every other layer stays float: a mixed plan is one model. The
activation scale and zero point of each quantized layer are the plan's (``act_quant``'s calibrated
parameters, passed as ``TensorQuantOverrides``); the weights, already on the plan's 8-bit grid,
are quantized per output channel by ORT, which finds the same codes.

What has no kernel on ONNX Runtime (:func:`kernel_problem`): sparsity (dense kernels multiply the
zeros), weights of 2-7 bits or in groups (no integer kernel for a Conv), activations below 8 bits,
16-bit float weights (the CPU kernels compute in float32). ``sensplan plan --runtime onnxruntime``
drops those options before solving and says which; ``apply`` runs a layer whose int8 weights lack
int8 activations (or the reverse) in float, and says so in metrics.json.

This module is torch-free (the planner uses it); the export, quantization and measurement on ONNX
Runtime are in :mod:`sensplan.planner._onnx`.

Timing hygiene (:func:`time_interleaved`): the models compared are timed in one process,
interleaved round by round, after a warm-up, on a fixed number of threads; the machine's load
average is recorded, and :func:`load_warning` says when it made the figures unreliable.

``onnx``, ``onnxruntime`` and ``onnxscript`` are the optional extra ``ort``
(``pip install -e ".[ort]"``).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from sensplan._errors import UserInputError

#: the runtimes ``--runtime`` takes
RUNTIMES = ("torch", "onnxruntime")
ORT_EXTRA = 'pip install -e ".[ort]" (onnx, onnxruntime, onnxscript)'


def check_runtime(name: str, flag: str = "--runtime") -> str:
    """``name`` when it is a runtime this machine can use; else one message naming the fix."""
    if name not in RUNTIMES:
        raise UserInputError(f"{flag} takes one of {', '.join(RUNTIMES)}. Got {name!r}.")
    if name == "onnxruntime":
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if not _importable(m)]
        if missing:
            raise UserInputError(f"{flag} onnxruntime needs {', '.join(missing)}, not installed here: "
                                 f"{ORT_EXTRA}. Or use {flag} torch.")
    return name


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- what runs on which runtime ------------------------------------------------------------------
def kernel_problem(runtime: str, effect: Mapping[str, Any], layer_type: str = "") -> str | None:
    """Why an option with ``effect`` (the scan's effect fields) would not run faster or smaller on
    ``runtime``; None when it does. ``layer_type``: the layer's class name (Conv2d, Linear, ...)."""
    if runtime != "onnxruntime":
        return None
    if float(effect.get("density", 1.0)) < 1.0 or effect.get("sparse_format") not in (None, "dense"):
        return "ONNX Runtime has no sparse kernel: the zeros are stored and multiplied"
    dtype = effect.get("weight_dtype")
    if dtype in ("float16", "bfloat16"):
        return "ONNX Runtime's CPU kernels compute in float32: 16-bit weights would be cast back"
    bits = effect.get("weight_bits")
    if dtype == "int" and bits is not None:
        if int(bits) != 8:
            return f"no ONNX Runtime kernel computes with {int(bits)}-bit weights of a {layer_type or 'layer'}"
        if int(effect.get("group_size") or 0):
            return "ONNX Runtime's int8 kernels take one scale per output channel, not per group"
    act = effect.get("act_bits")
    if act is not None and int(act) < 32 and int(act) != 8:
        return f"no ONNX Runtime kernel takes {int(act)}-bit activations (8 only)"
    return None


def runtime_options(scan: Any, runtime: str) -> tuple[Any, list[dict[str, Any]]]:
    """``scan`` without the probes whose option has no kernel on ``runtime`` (a new Scan), and
    what was dropped (unit, method, label, reason)."""
    from sensplan._tables import Scan

    if runtime == "torch":
        return scan, []
    kept, dropped = [], []
    for r in scan.results:
        layer = scan.layers.get(r["unit"]) or {}
        why = kernel_problem(runtime, r.get("effect") or {}, str(layer.get("type", "")))
        if why is None:
            kept.append(r)
        else:
            dropped.append({"unit": r["unit"], "method": r["method"], "label": r.get("label", r["method"]),
                            "reason": why})
    kept, requires = _couple_int8(kept, dropped)
    data = {**scan.data, "results": kept, **({"requires": requires} if requires else {})}
    return Scan(data, scan.sha256, scan.path), dropped


def _couple_int8(rows: list[Mapping[str, Any]], dropped: list[dict[str, Any]]
                 ) -> tuple[list[Mapping[str, Any]], list[list[str]]]:
    """ONNX Runtime computes in int8 only with 8-bit weights *and* 8-bit activations: a layer's
    8-bit weight options require one of its 8-bit activation options and the reverse
    (``requires``: [unit, axis, axis]: an option on the first axis needs one on the second); a
    layer scanned with only one of the two loses it (it would run in float)."""
    weight_axes: dict[str, str] = {}
    act_axes: dict[str, str] = {}
    for r in rows:
        e = r.get("effect") or {}
        if e.get("weight_dtype") == "int":
            weight_axes[r["unit"]] = r["axis"]
        if int(e.get("act_bits", 32)) == 8:
            act_axes[r["unit"]] = r["axis"]
    kept = []
    for r in rows:
        u = r["unit"]
        lone = (weight_axes.get(u) == r["axis"] and u not in act_axes) or (act_axes.get(u) == r["axis"]
                                                                            and u not in weight_axes)
        if lone:
            other = "activations" if u in weight_axes else "weights"
            dropped.append({"unit": u, "method": r["method"], "label": r.get("label", r["method"]),
                            "reason": f"ONNX Runtime computes in int8 only with 8-bit weights and activations, "
                                      f"and the scan has no 8-bit {other} option for this layer"})
        else:
            kept.append(r)
    requires = []
    for u, wa in weight_axes.items():
        if u in act_axes:
            requires += [[u, wa, act_axes[u]], [u, act_axes[u], wa]]
    return kept, requires


def summarize_dropped(dropped: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per (method, option label, reason), with how many units it concerned."""
    counts: dict[tuple[str, str, str], int] = {}
    for d in dropped:
        key = (d["method"], d["label"], d["reason"])
        counts[key] = counts.get(key, 0) + 1
    return [f"{label} ({method}) on {n} unit(s): {why}" for (method, label, why), n in counts.items()]


# -- timing ----------------------------------------------------------------------------------------
def machine_load() -> dict[str, Any]:
    """The load average over the last minute and the usable cores."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:  # not on every platform
        load1 = float("nan")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"loadavg_1m": round(load1, 2), "cores": cores}


def load_warning(before: Mapping[str, Any], after: Mapping[str, Any], threads: int,
                 times: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why the timings are unreliable, or None: other work held the cores the timing needed (the
    load average, less the timing's own threads, above the cores left over), or the runs spread
    widely (a p95 more than twice the p50)."""
    cores = int(before.get("cores") or 1)
    load = max(float(before.get("loadavg_1m") or 0.0), float(after.get("loadavg_1m") or 0.0))
    reasons = []
    if not math.isnan(load) and load - threads > max(0.5, cores - threads):
        reasons.append(f"the load average was {load:.1f} on {cores} cores while timing on {threads} thread(s)")
    spread = [k for k, t in times.items() if t.get("p50_ms") and t["p95_ms"] > 2 * t["p50_ms"]]
    if spread:
        reasons.append(f"{', '.join(spread)}: p95 more than twice the p50")
    return "; ".join(reasons) + ": other work competed for the cores, rerun on an idle machine" if reasons else None


def time_interleaved(runs: Mapping[str, Callable[[], Any]], *, warmup: int = 5, min_iters: int = 10,
                     max_iters: int = 200, max_seconds: float = 10.0,
                     sync: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Time each callable of ``runs`` the same number of times, interleaved round by round (so a
    change of the machine's load hits them alike): p50 and p95 in milliseconds. Stops after
    ``max_iters`` rounds, or after ``max_seconds`` once ``min_iters`` rounds are done."""
    sync = sync or (lambda: None)
    for fn in runs.values():
        for _ in range(warmup):
            fn()
        sync()
    times: dict[str, list[float]] = {k: [] for k in runs}
    deadline = time.perf_counter() + max_seconds
    rounds = 0
    while rounds < max_iters and (rounds < min_iters or time.perf_counter() < deadline):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
    out = {}
    for k, ts in times.items():
        ts.sort()
        out[k] = {"p50_ms": statistics.median(ts), "p95_ms": ts[min(len(ts) - 1, int(0.95 * len(ts)))],
                  "iters": len(ts)}
    return out


def compare_latency(models: Mapping[str, Callable[[Any], Any]], example: Any,
                    batches: Sequence[int],
                    *, threads: int, max_seconds: float = 10.0, sync: Callable[[], None] | None = None
                    ) -> dict[str, Any]:
    """Latency of every model of ``models`` at each batch size, timed interleaved (see
    :func:`time_interleaved`), with the machine's load before and after and a warning when the load
    made the figures unreliable. ``example``: one input (a tensor, or an array for a runtime that
    takes arrays); a batch repeats it."""
    load0 = machine_load()
    per_batch: dict[str, Any] = {}
    for b in dict.fromkeys(batches):
        x = (np.ascontiguousarray(np.repeat(example[:1], b, axis=0)) if isinstance(example, np.ndarray)
             else example[:1].expand(b, *example.shape[1:]).contiguous())
        per_batch[str(b)] = time_interleaved({k: _bound(fn, x) for k, fn in models.items()},
                                             max_seconds=max_seconds, sync=sync)
    load1 = machine_load()
    flat = {f"{k} at batch {b}": t for b, ts in per_batch.items() for k, t in ts.items()}
    return {"batches": per_batch, "threads": threads, "load_before": load0, "load_after": load1,
            "warning": load_warning(load0, load1, threads, flat)}


def _bound(fn: Callable[[Any], Any], x: Any) -> Callable[[], Any]:
    return lambda: fn(x)
