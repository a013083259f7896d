"""Runtimes: where a compressed model really runs, and honest timing of it.

``torch`` is eager PyTorch (what the scan measured). ``onnxruntime`` exports the model to ONNX
(pruned shapes are real: the exporter sees the smaller tensors), and turns the layers the plan gives
8-bit integer weights *and* 8-bit integer activations into QDQ nodes with onnxruntime's own
quantization tooling (``quantize_static``), so that ONNX Runtime fuses them into its integer kernels
(QLinearConv, QLinearMatMul). Every other layer stays float: a mixed plan is one model. The
activation scale and zero point of each quantized layer are the plan's (``act_quant``'s calibrated
parameters, passed as ``TensorQuantOverrides``); the weights, already on the plan's 8-bit grid,
are quantized per output channel by ORT, which finds the same codes.

A Linear layer's weight-only integer weights of 2, 4 or 8 bits (per output channel or in groups,
with or without zero points) become ``MatMulNBits`` nodes carrying the plan's own codes, scales and
zero points (:mod:`sensplan.planner._ort_nbits`); its activations then run in float.

What has no kernel on ONNX Runtime (:func:`kernel_problem`): sparsity (dense kernels multiply the
zeros), a Conv's weights of 2-7 bits or in groups or with zero points, a Linear's of 3, 5, 6 or 7
bits (MatMulNBits takes 2, 4 and 8), activations below 8 bits, 16-bit float weights (the CPU
kernels compute in float32). ``sensplan plan --runtime onnxruntime``
drops those options before solving and says which; ``apply`` runs a Conv whose int8 weights lack
int8 activations (or any layer with int8 activations without int8 weights) in float, and says so
in metrics.json.

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

from sensplan._effects import is_sparse
from sensplan._errors import UserInputError
from sensplan.planner._ort_nbits import NBITS_LAYER_TYPES, nbits_problem

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
    if is_sparse(effect):
        return "ONNX Runtime has no sparse kernel: the zeros are stored and multiplied"
    dtype = effect.get("weight_dtype")
    if dtype in ("float16", "bfloat16"):
        return "ONNX Runtime's CPU kernels compute in float32: 16-bit weights would be cast back"
    bits = effect.get("weight_bits")
    if dtype == "int" and bits is not None and not int8_weights(effect):
        # weight-only kernel: a Linear's weights as MatMulNBits (2, 4 or 8 bits, groups, zero points)
        if layer_type not in NBITS_LAYER_TYPES:
            if int(bits) != 8:
                return f"no ONNX Runtime kernel computes with {int(bits)}-bit weights of a {layer_type or 'layer'}"
            if int(effect.get("group_size") or 0):
                return "ONNX Runtime's int8 kernels take one scale per output channel, not per group"
            return "ONNX Runtime's int8 kernels take symmetric weights (no zero point)"
        why = nbits_problem(effect)
        if why:
            return why
    act = effect.get("act_bits")
    if act is not None and int(act) < 32 and int(act) != 8:
        return f"no ONNX Runtime kernel takes {int(act)}-bit activations (8 only)"
    return None


def int8_activations(effect: Mapping[str, Any]) -> bool:
    """Whether ``effect`` quantizes the layer's input to 8 bits, as ONNX Runtime's int8 kernels take it."""
    return int(effect.get("act_bits", 32)) == 8


def int8_weights(effect: Mapping[str, Any]) -> bool:
    """Whether ``effect`` stores weights as ONNX Runtime's int8 kernels take them: 8-bit integers,
    symmetric, one scale per output channel."""
    return (effect.get("weight_dtype") == "int" and int(effect.get("weight_bits", 32)) == 8
            and not int(effect.get("group_size") or 0) and not int(effect.get("zero_point_bits") or 0))


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
                 ) -> tuple[list[Mapping[str, Any]], list[list[Any]]]:
    """ONNX Runtime computes in int8 only with 8-bit weights *and* 8-bit activations: a layer's
    8-bit weight options require one of its 8-bit activation options and the reverse
    (``requires``: [unit, axis, option key, other axis, the other axis's option keys it allows]);
    so an 8-bit activation goes with neither float weights nor another weight format (e.g. 4-bit
    weights, which run as MatMulNBits with float activations). A layer scanned with only one of the
    two loses it (it would run in float)."""
    from sensplan.planner._costs import option_key

    weight_axes: dict[str, str] = {}
    act_axes: dict[str, str] = {}
    w8_keys: dict[str, list[str]] = {}
    a8_keys: dict[str, list[str]] = {}
    for r in rows:
        e = r.get("effect") or {}
        if int8_weights(e):
            weight_axes[r["unit"]] = r["axis"]
            w8_keys.setdefault(r["unit"], []).append(option_key(r["method"], r["setting"]))
        if int8_activations(e):
            act_axes[r["unit"]] = r["axis"]
            a8_keys.setdefault(r["unit"], []).append(option_key(r["method"], r["setting"]))
    kept = []
    requires: list[list[Any]] = []
    for r in rows:
        u, e = r["unit"], r.get("effect") or {}
        w8, a8 = int8_weights(e), int8_activations(e)
        lone = (w8 and u not in act_axes) or (a8 and u not in weight_axes)
        if w8 and not lone:
            requires.append([u, r["axis"], option_key(r["method"], r["setting"]), act_axes[u], a8_keys[u]])
        if a8 and not lone:
            requires.append([u, r["axis"], option_key(r["method"], r["setting"]), weight_axes[u], w8_keys[u]])
        if lone:
            other = "activations" if u in weight_axes else "weights"
            dropped.append({"unit": u, "method": r["method"], "label": r.get("label", r["method"]),
                            "reason": f"ONNX Runtime computes in int8 only with 8-bit weights and activations, "
                                      f"and the scan has no 8-bit {other} option for this layer"})
        else:
            kept.append(r)
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
    """The load average over the last minute, the usable cores, and (where ``/proc/stat`` exists) a
    sample of the CPU time every process used and this one used, to tell between two samples how
    many cores *other* work kept busy (:func:`other_cores`)."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:  # not on every platform
        load1 = float("nan")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out: dict[str, Any] = {"loadavg_1m": round(load1, 2), "cores": cores}
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        tick = float(os.sysconf("SC_CLK_TCK"))
        busy = (sum(fields) - fields[3] - fields[4]) / tick  # all but idle and iowait
        own = os.times()
        out["_cpu"] = [time.monotonic(), busy, own.user + own.system]
    except (OSError, ValueError, IndexError):
        pass
    return out


def other_cores(before: Mapping[str, Any], after: Mapping[str, Any]) -> float | None:
    """The cores other processes kept busy on average between two :func:`machine_load` samples
    (the machine's busy CPU time less this process's, over the wall time); None where unknown."""
    a, b = before.get("_cpu"), after.get("_cpu")
    if not a or not b or b[0] - a[0] <= 0:
        return None
    return max(0.0, float((b[1] - a[1]) - (b[2] - a[2])) / float(b[0] - a[0]))


def load_warning(before: Mapping[str, Any], after: Mapping[str, Any], threads: int,
                 times: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why the timings are unreliable, or None: other work held cores the timing needed (other
    processes kept more cores busy than the ``cores - threads`` left over, less half a core; by
    ``/proc/stat``, else by the load average less the timing's own threads), or the runs spread
    widely (a p95 more than twice the p50)."""
    cores = int(before.get("cores") or 1)
    spare = max(0.5, cores - threads - 0.5)
    others = other_cores(before, after)
    reasons = []
    if others is not None:
        if others > spare:
            reasons.append(f"other processes kept {others:.1f} of {cores} cores busy while timing on {threads} "
                           f"thread(s)")
    else:
        load = max(float(before.get("loadavg_1m") or 0.0), float(after.get("loadavg_1m") or 0.0))
        if not math.isnan(load) and load - threads > spare:
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
    others = other_cores(load0, load1)
    return {"batches": per_batch, "threads": threads, "load_before": public_load(load0),
            "load_after": public_load(load1), "other_cores_busy": None if others is None else round(others, 2),
            "warning": load_warning(load0, load1, threads, flat)}


def public_load(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A :func:`machine_load` sample as recorded in files (without the raw CPU counters)."""
    return {k: v for k, v in sample.items() if not k.startswith("_")}


def _bound(fn: Callable[[Any], Any], x: Any) -> Callable[[], Any]:
    return lambda: fn(x)
