"""``sensplan profile``: a latency cost table measured on the runtime the model is deployed with.

The table (``sensplan.cost_table``, metric ``latency``, unit ms) prices every option of a scan:

* each weighted layer, timed alone at its real input shape, at every combination of the widths of
  the channel group feeding it and the group it feeds (a joint entry over the two groups: a
  layer's time is not the sum of the two changes, and a width a kernel dislikes can cost more
  than a wider one; the table shows it and the solver sees it);
* on ONNX Runtime, each layer's 8-bit activation option: the layer as an int8 QDQ operator (ORT
  fuses it into QLinearConv / QLinearMatMul) at every width, the cost of the quantize and
  dequantize at its borders taken off (inside an int8 chain they are not run). A plan for
  ``--runtime onnxruntime`` couples the 8-bit activation option with the 8-bit weight option (ORT
  runs int8 only with both);
* on ONNX Runtime, each Linear's weight-only integer options (2, 4 or 8 bits, per channel or in
  groups, with or without zero points): the layer as the one ``MatMulNBits`` node ``apply`` makes
  of it (:mod:`sensplan.planner._ort_nbits`: the same block size, packed codes, scales and zero
  points, here of random weights) at every width, as a factor of its own: the layer's weight axis.
  The node computes with float activations, so with one of these weights the layer's 8-bit
  activation option costs the same time (``apply`` runs that layer as MatMulNBits, its
  activations float); only 8-bit per-channel symmetric weights make it an int8 operator. A plan
  for ``--runtime onnxruntime`` never chooses those cells (an 8-bit activation goes only with
  8-bit weights there); they are priced for a plan made without ``--runtime``;
* a calibration against the whole model, measured here: layers timed alone are not the model (the
  runtime fuses a layer with its activation; a smaller layer saves less inside the model than
  alone). The whole model is timed at full width, with every group pruned at its option nearest
  half its channels, and (on ONNX Runtime) with every int8-able layer in int8; a ``scale`` maps
  the sum of the layers' times onto the first two, an ``int8_factor`` the int8 savings onto the
  third (``profile.calibration`` records both and the measurements). The MatMulNBits times take
  the same ``scale``; no whole-model run checks them (the model is not timed with its Linears as
  MatMulNBits);
* a fixed ``overhead``: the whole model's time less the scaled sum of its layers' times
  (everything that is not a weighted layer: activations, pooling, additions, the framework).

So the table predicts a plan's latency as overhead + scale * (the layers' times at the plan's widths
and precisions). ``apply`` measures the real end-to-end latency, and metrics.json compares the two.

Each operator is timed alone: a torch module for ``--runtime torch``; a one-operator ONNX model
built with ``onnx.helper`` for ``--runtime onnxruntime``. Operators of equal shape are timed once.
Supported layers: Conv1d/Conv2d and Linear; other layers keep their time in the overhead. The
weight-only integer options ONNX Runtime has no kernel for (a Linear's of 3, 5, 6 or 7 bits, a
Conv's other than 8-bit per channel with 8-bit activations) cost the layer's float time, and
``profile.unpriced`` lists them with the reason (``plan --runtime onnxruntime`` does not offer
them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sensplan._artifacts import now_iso, versions
from sensplan.planner._costs import COST_TABLE_FORMAT, option_key
from sensplan.planner._ort_nbits import NBITS_LAYER_TYPES, weight_only
from sensplan.planner._runtime import (
    int8_activations,
    int8_weights,
    kernel_problem,
    load_warning,
    machine_load,
    other_cores,
    public_load,
    time_interleaved,
)

#: each operator's timing: rounds at least / at most, and seconds after the minimum
_MIN_ITERS, _MAX_ITERS, _SECONDS = 10, 200, 0.4


@dataclass(frozen=True)
class _Op:
    """One weighted operator at one shape: what gets timed (hashable: equal ops are timed once)."""

    kind: str  # "conv" | "linear"
    in_shape: tuple[int, ...]  # with the batch
    out_features: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    int8: bool = False
    #: a Linear as a MatMulNBits node: its weights' bits (32: float), group size (0: one scale per
    #: output channel) and whether it has zero points
    bits: int = 32
    group_size: int = 0
    zero_points: bool = False


def _op_of(module: nn.Module, in_shape: tuple[int, ...]) -> _Op | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module.padding, str):
        return _Op("conv", in_shape, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                   tuple(module.padding), tuple(module.dilation), module.groups, module.bias is not None)
    if isinstance(module, nn.Linear):
        return _Op("linear", in_shape, module.out_features, bias=module.bias is not None)
    return None


def _shrunk(op: _Op, side: str, removed: int, channels: int = 0) -> _Op:
    """``op`` when its group of ``channels`` loses ``removed`` on its ``side`` ("in" or "out"): a
    member whose dim is a multiple of the group's channels loses that many times more (a Linear
    after a flatten loses each channel's positions; an attention projection each head's width); a
    depthwise convolution loses them on both sides, with its groups."""
    import dataclasses

    channels_in = op.in_shape[1] if op.kind == "conv" else op.in_shape[-1]
    dim = op.out_features if side == "out" else channels_in
    if channels and dim != channels and dim % channels == 0:
        removed *= dim // channels
    depthwise = op.kind == "conv" and op.groups == channels_in == op.out_features and op.groups > 1
    out = op.out_features - removed if side == "out" or depthwise else op.out_features
    cin = channels_in - removed if side == "in" or depthwise else channels_in
    shape = list(op.in_shape)
    shape[1 if op.kind == "conv" else -1] = cin
    return dataclasses.replace(op, in_shape=tuple(shape), out_features=out,
                               groups=cin if depthwise else op.groups)


# -- timing one operator -------------------------------------------------------------------------
class _TorchTimer:
    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __call__(self, op: _Op) -> float:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(op.in_shape, generator=g)
        if op.kind == "conv":
            conv: Any = nn.Conv1d if len(op.kernel) == 1 else nn.Conv2d
            m: nn.Module = conv(op.in_shape[1], op.out_features, op.kernel, op.stride, op.padding, op.dilation,
                                op.groups, op.bias)
        else:
            m = nn.Linear(op.in_shape[-1], op.out_features, op.bias)
        m.eval()
        with torch.inference_mode():
            t = time_interleaved({"op": lambda: m(x)}, warmup=3, min_iters=_MIN_ITERS, max_iters=_MAX_ITERS,
                                 max_seconds=_SECONDS)
        return float(t["op"]["p50_ms"])


class _OrtTimer:
    """Times a one-operator ONNX model built by hand (float, or int8 QDQ with the borders' quantize
    and dequantize timed separately and taken off)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def _session(self, model: Any) -> Any:
        from sensplan.planner._onnx import ort_session

        return ort_session(model.SerializeToString(), self.threads)

    def _time(self, model: Any, x: np.ndarray) -> float:
        s = self._session(model)
        name = s.get_inputs()[0].name
        t = time_interleaved({"op": lambda: s.run(None, {name: x})}, warmup=3, min_iters=_MIN_ITERS,
                             max_iters=_MAX_ITERS, max_seconds=_SECONDS)
        return float(t["op"]["p50_ms"])

    def __call__(self, op: _Op) -> float:
        from onnx import TensorProto, helper, numpy_helper

        if op.bits < 32:
            return self._nbits(op)
        rng = np.random.default_rng(0)
        x = rng.standard_normal(op.in_shape).astype(np.float32)
        cin = op.in_shape[1] if op.kind == "conv" else op.in_shape[-1]
        if op.kind == "conv":
            w_shape = (op.out_features, cin // op.groups, *op.kernel)
        else:
            w_shape = (op.out_features, cin) if len(op.in_shape) == 2 else (cin, op.out_features)
        w = rng.standard_normal(w_shape).astype(np.float32) * 0.1
        inits = []
        nodes = []
        x_name = "x"
        if op.int8:
            inits += [numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
                      numpy_helper.from_array(np.array(128, np.uint8), "zx"),
                      numpy_helper.from_array(np.array(0.05, np.float32), "sy"),
                      numpy_helper.from_array(np.array(128, np.uint8), "zy")]
            nodes += [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
                      helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"])]
            x_name = "xd"
            axis = 1 if op.kind == "linear" and len(op.in_shape) > 2 else 0
            scale = (np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis)) / 127).astype(np.float32)
            shape = [1] * w.ndim
            shape[axis] = -1
            wq = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale, "sw"),
                      numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), "zw")]
            nodes.append(helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], axis=axis))
        else:
            inits.append(numpy_helper.from_array(w, "w"))
        y_name = "yf" if op.int8 else "y"
        bias = [numpy_helper.from_array(np.zeros(op.out_features, np.float32), "b")] if op.bias else []
        inits += bias
        if op.kind == "conv":
            n = len(op.kernel)
            nodes.append(helper.make_node("Conv", [x_name, "w", *(["b"] if op.bias else [])], [y_name],
                                          kernel_shape=list(op.kernel), strides=list(op.stride),
                                          pads=list(op.padding) * 2, dilations=list(op.dilation), group=op.groups))
            out_shape: list[Any] = [op.in_shape[0], op.out_features, *(["?"] * n)]
        elif len(op.in_shape) == 2:
            nodes.append(helper.make_node("Gemm", [x_name, "w", *(["b"] if op.bias else [])], [y_name], transB=1))
            out_shape = [op.in_shape[0], op.out_features]
        else:
            mm = y_name if not op.bias else "mm"
            nodes.append(helper.make_node("MatMul", [x_name, "w"], [mm]))
            if op.bias:
                nodes.append(helper.make_node("Add", ["mm", "b"], [y_name]))
            out_shape = [*op.in_shape[:-1], op.out_features]
        if op.int8:
            nodes += [helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["yq"]),
                      helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
        vin = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(op.in_shape))
        graph = helper.make_graph(nodes, "op", [vin], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        t = self._time(model, x)
        if op.int8:  # the borders: quantize the input, dequantize the output (not run inside an int8 chain)
            t -= self._border(op.in_shape, x) + self._border(tuple(self._out_shape(op, out_shape)), None)
            t = max(t, 0.0)
        return t

    def _nbits(self, op: _Op) -> float:
        """A Linear as ``apply`` writes it for weight-only integer weights: one MatMulNBits node
        (:func:`~sensplan.planner._ort_nbits.apply_nbits`: a Gemm's bias as the node's; a MatMul's
        Add kept after it), its packed codes, scales and zero points from random weights."""
        from onnx import TensorProto, helper, numpy_helper

        from sensplan.planner._ort_nbits import MS_DOMAIN, matmul_nbits

        rng = np.random.default_rng(0)
        x = rng.standard_normal(op.in_shape).astype(np.float32)
        k, n = op.in_shape[-1], op.out_features
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
        gemm = len(op.in_shape) == 2  # the exporter's Gemm (bias inside) or MatMul + Add
        inits = [numpy_helper.from_array(np.zeros(n, np.float32), "bias")] if op.bias else []
        mm = "mm" if op.bias and not gemm else "y"
        node, more, _ = matmul_nbits("x", [mm], w, op.bits, op.group_size, not op.zero_points, "w",
                                     "bias" if op.bias and gemm else None)
        inits += more
        nodes = [node, *([helper.make_node("Add", ["mm", "bias"], ["y"])] if mm != "y" else [])]
        vin = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(op.in_shape))
        graph = helper.make_graph(nodes, "op", [vin], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = 10
        return self._time(model, x)

    def _out_shape(self, op: _Op, template: list[Any]) -> list[int]:
        if op.kind != "conv":
            return [int(v) for v in template]
        size = []
        for i, k in enumerate(op.kernel):
            n = op.in_shape[2 + i]
            size.append((n + 2 * op.padding[i] - op.dilation[i] * (k - 1) - 1) // op.stride[i] + 1)
        return [op.in_shape[0], op.out_features, *size]

    def _border(self, shape: tuple[int, ...], x: np.ndarray | None) -> float:
        """One quantize (float to uint8) or dequantize (uint8 to float) of a tensor of ``shape``:
        the quantize's time for the input side, the dequantize's for the output side."""
        from onnx import TensorProto, helper, numpy_helper

        inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                 numpy_helper.from_array(np.array(128, np.uint8), "z")]
        if x is not None:
            node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
            vin = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
            arr = x
        else:
            node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"])
            vin = helper.make_tensor_value_info("x", TensorProto.UINT8, list(shape))
            arr = np.full(shape, 128, np.uint8)
        out_type = TensorProto.UINT8 if x is not None else TensorProto.FLOAT
        graph = helper.make_graph([node], "border", [vin], [helper.make_tensor_value_info("y", out_type, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        return self._time(model, arr)


# -- the table -------------------------------------------------------------------------------------
def input_shapes(model: nn.Module, example: torch.Tensor, names: set[str]) -> dict[str, tuple[int, ...]]:
    """The input shape of each module of ``names`` on ``example`` (one forward pass)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, mod in model.named_modules():
        if name in names:
            def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    shapes.setdefault(name, tuple(args[0].shape))
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def profile(model: nn.Module, example: torch.Tensor, scan: Any, *, runtime: str, batch: int, threads: int,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The latency cost table of ``scan``'s options for ``model`` on ``runtime`` at ``batch``
    (see the module docstring). ``example``: one input item."""
    t0 = time.perf_counter()
    load0 = machine_load()
    model = model.eval()
    x = example[:1].expand(batch, *example.shape[1:]).contiguous().cpu()
    members = {g: [(str(m[0]), str(m[1])) for m in info.get("members", [])] for g, info in scan.groups.items()}
    names = set(scan.layers) | {m for ms in members.values() for m, _ in ms}
    mods = dict(model.named_modules())
    shapes = input_shapes(model, x, names)
    ops = {n: op for n in names if n in mods and n in shapes and (op := _op_of(mods[n], shapes[n])) is not None}
    timer = _OrtTimer(threads) if runtime == "onnxruntime" else _TorchTimer(threads)
    cache: dict[_Op, float] = {}

    def t(op: _Op) -> float:
        if op not in cache:
            cache[op] = timer(op)
        return cache[op]

    entries: dict[str, dict[str, Any]] = {}
    not_profiled: dict[str, str] = {}
    base = {n: t(op) for n, op in ops.items()}
    rows_by_block: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in scan.results:
        rows_by_block.setdefault((r["unit"], r["axis"]), []).append(r)
    groups_of = _groups_of(members, {g for g in scan.groups if rows_by_block.get((g, "channels"))})
    raw: dict[str, tuple[list[tuple[str, str]], list[list[str]], np.ndarray, np.ndarray | None]] = {}
    # per layer with MatMulNBits options: its weight axis's option keys, and per key the format's
    # time at every width (None: the option is not a MatMulNBits node; it costs the float time)
    nbits: dict[str, tuple[list[str], list[np.ndarray | None]]] = {}
    for layer, op in ops.items():
        # factors: the group on each side, then the layer's weight axis when a Linear has weight-only
        # integer options (MatMulNBits), then its int8 (8-bit activation) option
        factors: list[tuple[str, str]] = []
        options: list[list[str]] = []
        grids: list[list[tuple[str, int]]] = []  # per factor option: (side, removed)
        group_channels: list[int] = []
        for g, side in groups_of.get(layer, {}).items():
            rows = rows_by_block[(g, "channels")]
            factors.append((g, "channels"))
            options.append(["none", *(option_key(r["method"], r["setting"]) for r in rows)])
            grids.append([(side, 0), *((side, int((r.get("effect") or {}).get("removed", 0))) for r in rows)])
            group_channels.append(int(scan.groups[g]["channels"]))
        weight_rows = rows_by_block.get((layer, "weight"), []) if runtime == "onnxruntime" and op.kind == "linear" \
            else []
        formats = [_nbits_format(r.get("effect") or {}) for r in weight_rows]
        if any(formats):
            factors.append((layer, "weight"))
            options.append(["none", *(option_key(r["method"], r["setting"]) for r in weight_rows)])
        int8_keys = [option_key(r["method"], r["setting"]) for r in rows_by_block.get((layer, "activation"), [])
                     if runtime == "onnxruntime" and int8_activations(r.get("effect") or {})]
        if int8_keys:
            factors.append((layer, "activation"))
            options.append(["none", *int8_keys])
        shape = [len(o) for o in options]
        grid = np.zeros([len(o) for o in options[:len(grids)]])
        grid8 = np.zeros_like(grid) if int8_keys else None  # the int8 form at every width
        by_format = {f: np.zeros_like(grid) for f in dict.fromkeys(formats) if f}  # each MatMulNBits form
        for idx in np.ndindex(*grid.shape):
            shrunk = op
            for f, k in enumerate(idx):
                side, removed = grids[f][k]
                if removed:
                    shrunk = _shrunk(shrunk, side, removed, group_channels[f])
            grid[idx] = t(shrunk)
            if grid8 is not None:
                grid8[idx] = t(_with(shrunk, int8=True))
            for (bits, group_size, zero_points), at in by_format.items():
                at[idx] = t(_with(shrunk, bits=bits, group_size=group_size, zero_points=zero_points))
        raw[layer] = (factors, options, grid, grid8)
        if by_format:
            nbits[layer] = (options[len(grids)][1:], [by_format[f] if f else None for f in formats])
        if progress and factors:
            progress(f"{layer}: {int(np.prod(shape))} option(s)")
    for layer in scan.layers:
        if layer not in ops:
            not_profiled[layer] = f"{type(mods.get(layer)).__name__}: only Conv1d/Conv2d and Linear are timed"
    # calibration: the layers timed alone against the whole model timed at full width, at about half
    # the width (every group pruned at its option nearest half its channels) and all in int8
    whole = _whole_model(model, x, runtime, threads)
    parts = sum(base.values())
    cal = _calibrate(model, x, scan, rows_by_block, groups_of, ops, base, raw, t, whole, runtime, threads)
    scale, int8_factor = cal["scale"], cal["int8_factor"]
    int8_fitted = bool(cal.pop("int8_fitted", False))
    if parts > 0 and whole - scale * parts < 0:
        # the fit's time outside the layers is negative: extrapolated, it prices a small enough
        # model at nothing. Kept at 0, with the full model's time exact (a smaller scale, which
        # overprices the pruned widths: the plan errs toward a faster model than asked)
        cal["how"].append({"widths": "full, the time outside the layers",
                           "failed": f"the fitted scale {scale:.3g} leaves {whole - scale * parts:.3g} ms of the "
                                     f"model's {whole:.3g} ms outside its layers (below 0); scale {whole / parts:.3g} "
                                     f"kept, which prices the time outside the layers at 0"})
        fitted, scale = scale, whole / parts
        cal["scale"] = scale
        if int8_fitted:
            # the int8 factor was fitted as a share of the saving at the fitted scale: the same saving
            int8_factor = cal["int8_factor"] = float(min(3.0, int8_factor * fitted / scale))
    for layer, (factors, options, grid, grid8) in raw.items():
        if not factors:
            if layer in scan.layers:
                entries[f"layer:{layer}"] = {"unit": layer, "costs": {"none": scale * base[layer]}}
            continue
        costs = scale * grid
        int8 = scale * (grid + int8_factor * (grid8 - grid)) if grid8 is not None else None
        if layer in nbits:  # the weight axis: a MatMulNBits option its own time, any other the float one
            # (with the 8-bit activation option too: apply runs the layer as MatMulNBits, activations
            # float; only 8-bit per-channel weights, not MatMulNBits's, make it an int8 operator)
            timed = nbits[layer][1]
            costs = np.stack([costs, *(costs if g is None else scale * g for g in timed)], axis=-1)
            if int8 is not None:
                int8 = np.stack([int8, *(int8 if g is None else scale * g for g in timed)], axis=-1)
        if int8 is not None:  # the int8 option: the float time changed by the (calibrated) int8 saving
            costs = np.stack([costs, *([int8] * (len(options[-1]) - 1))], axis=-1)
        entries[f"layer:{layer}"] = {"unit": layer, "factors": [list(f) for f in factors], "options": options,
                                     "costs": costs.tolist()}
    # weight-only integer options ONNX Runtime has no kernel for: the layer's float time, and why
    unpriced = {} if runtime != "onnxruntime" else \
        _unpriced(scan, {(layer, key) for layer, (keys, timed) in nbits.items()
                         for key, g in zip(keys, timed, strict=True) if g is not None})
    load1 = machine_load()
    return {"format": COST_TABLE_FORMAT, "schema_version": 1, "metric": "latency", "unit": "ms",
            "overhead": max(0.0, whole - scale * parts), "entries": entries,
            "profile": {"runtime": runtime, "batch": batch, "threads": threads, "created": now_iso(),
                        "versions": versions(), "model_ms": whole, "layers_ms": parts,
                        "calibration": cal, "operators_timed": len(cache), "not_profiled": not_profiled,
                        **({"unpriced": unpriced} if unpriced else {}),
                        "scan": {"path": scan.path or None, "sha256": scan.sha256 or None},
                        "load_before": public_load(load0), "load_after": public_load(load1),
                        "other_cores_busy": other_cores(load0, load1),
                        "warning": load_warning(load0, load1, threads, {}),
                        "seconds": round(time.perf_counter() - t0, 2)}}


def _nbits_format(effect: Mapping[str, Any]) -> tuple[int, int, bool] | None:
    """(bits, group size, zero points) of an option ``apply --runtime onnxruntime`` runs as a
    MatMulNBits node on a Linear: weight-only integers of 2, 4 or 8 bits, not the 8-bit per-channel
    symmetric ones ORT's int8 kernels take with 8-bit activations (a plan ties those to them);
    None for any other option."""
    if not weight_only(effect) or int8_weights(effect) or int(effect.get("act_bits", 32)) < 32:
        return None
    zero_points = bool(int(effect.get("zero_point_bits") or 0))
    return int(effect["weight_bits"]), int(effect.get("group_size") or 0), zero_points


def _unpriced(scan: Any, timed: set[tuple[str, str]]) -> dict[str, str]:
    """``{"<layer> <option key>": why}``: the scan's weight-only integer options that were not timed
    (the layer's float time stands for them) because ONNX Runtime has no kernel for them; ``timed``:
    the (layer, option key) pairs timed as MatMulNBits."""
    out: dict[str, str] = {}
    for r in scan.results:
        e = r.get("effect") or {}
        key = option_key(r["method"], r["setting"])
        if r.get("axis") != "weight" or e.get("weight_dtype") != "int" or int8_weights(e) \
                or int(e.get("act_bits", 32)) < 32 or (str(r["unit"]), key) in timed:
            continue
        layer_type = str((scan.layers.get(str(r["unit"])) or {}).get("type", ""))
        why = kernel_problem("onnxruntime", e, layer_type)
        if why is None and layer_type not in NBITS_LAYER_TYPES:
            why = f"no ONNX Runtime kernel computes with weight-only integers of a {layer_type or 'layer'}"
        out[f"{r['unit']} {key}"] = (f"{why}; plan --runtime onnxruntime does not offer it" if why else
                                     "the layer was not timed (profile.not_profiled says why)")
    return out


def _groups_of(members: Mapping[str, list[tuple[str, str]]], scanned: set[str]) -> dict[str, dict[str, str]]:
    """Layer -> the scanned groups that shrink it -> the side ("in" or "out"), in side order (in,
    then out); a group on both sides of one layer (a depthwise convolution) once, as _shrunk
    shrinks both sides for it."""
    by_side: dict[str, dict[str, str]] = {}
    for g, ms in members.items():
        if g in scanned:
            for m, side in ms:
                by_side.setdefault(m, {})[side] = g
    out: dict[str, dict[str, str]] = {}
    for layer, sides in by_side.items():
        for side, g in sorted(sides.items()):
            out.setdefault(layer, {}).setdefault(g, side)
    return out


def _calibrate(model: nn.Module, x: torch.Tensor, scan: Any, rows_by_block: Mapping[tuple[str, str], Any],
               groups_of: Mapping[str, Mapping[str, str]], ops: Mapping[str, _Op], base: Mapping[str, float],
               raw: Mapping[str, Any], t: Callable[[_Op], float], whole: float, runtime: str, threads: int
               ) -> dict[str, Any]:
    """Operators timed alone are not the model: the runtime fuses a layer with its activation, and a
    smaller layer saves less than alone. Fit ``whole = overhead + scale * (sum of the layers' times)``
    through two whole-model measurements (full width, and every group pruned at its option nearest
    half its channels), then ``int8_factor``: how much of the int8 saving the layers timed alone
    promised the whole model in int8 delivers. Both are measured here, on profile's own runs."""
    import copy

    from sensplan.sensitivity import channel_graph

    out: dict[str, Any] = {"scale": 1.0, "int8_factor": 1.0, "how": []}
    full = sum(base.values())
    half: dict[str, int] = {}
    for g in scan.groups:
        rows = rows_by_block.get((g, "channels"), [])
        if rows:
            channels = int(scan.groups[g]["channels"])
            r = min(rows, key=lambda r: abs(int(r["effect"]["removed"]) - channels / 2))
            half[g] = int(r["effect"]["removed"])
    if half:
        try:
            pruned = copy.deepcopy(model)
            graph = channel_graph(pruned, x[:1])
            chosen = {g: graph.select(g, k) for g, k in half.items()}
            for g, idxs in chosen.items():
                graph.prune_(g, idxs)
            smaller = 0.0
            for layer, op in ops.items():
                for g, side in groups_of.get(layer, {}).items():
                    op = _shrunk(op, side, half[g], int(scan.groups[g]["channels"]))
                smaller += t(op)
            measured = _whole_model(pruned, x, runtime, threads)
            step: dict[str, Any] = {"widths": "each group at its option nearest half its channels",
                                    "model_ms": measured, "layers_ms": smaller}
            scale = (whole - measured) / (full - smaller) if full - smaller > 1e-9 * full else float("nan")
            if 0.2 <= scale <= 5.0:
                out["scale"] = scale
            else:
                step["failed"] = (f"the whole model changed {scale:.2g} times as much as its layers timed alone "
                                  f"(outside 0.2 to 5): the layers do not explain its time; scale 1 kept")
            out["how"].append(step)
        except Exception as e:  # noqa: BLE001 - the table stands uncalibrated; said so
            out["how"].append({"failed": f"{type(e).__name__}: {e}"})
    int8_layers = {n for n, (_, _, _, grid8) in raw.items() if grid8 is not None}
    if runtime == "onnxruntime" and int8_layers:
        saving = sum(float(raw[n][3].flat[0]) - base[n] for n in int8_layers)
        try:
            measured = _whole_model(model, x, runtime, threads, int8=int8_layers)
            step = {"widths": "full, every layer with an 8-bit activation option in int8", "model_ms": measured}
            if saving < 0:
                factor = (measured - whole) / (out["scale"] * saving)
                out["int8_factor"] = float(min(3.0, max(0.0, factor)))
                out["int8_fitted"] = True  # popped by profile (not written)
                if factor <= 0:
                    step["failed"] = (f"the whole model in int8 took {measured:.3g} ms against {whole:.3g} ms in "
                                      f"float: int8 saves nothing here, so the table prices it at the float time")
            out["how"].append(step)
        except Exception as e:  # noqa: BLE001
            out["how"].append({"failed": f"{type(e).__name__}: {e}"})
    return out


def _with(op: _Op, **kw: Any) -> _Op:
    import dataclasses

    return dataclasses.replace(op, **kw)


def _whole_model(model: nn.Module, x: torch.Tensor, runtime: str, threads: int,
                 int8: set[str] | None = None) -> float:
    """The whole model's latency at ``x``'s batch on ``runtime`` (median of interleaved rounds);
    ``int8``: on ONNX Runtime, these layers as int8 QDQ nodes (calibrated on ``x``)."""
    if runtime == "onnxruntime":
        import tempfile
        from pathlib import Path

        from sensplan.planner._onnx import OrtModel, export_onnx, quantize_onnx

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "model.onnx"
            info = export_onnx(model, x[:1], path)
            if int8:
                q = Path(d) / "int8.onnx"
                quantize_onnx(path, q, dict.fromkeys(int8, "int8"), info["act_params"], x.numpy(),
                              modules={n for n, _ in model.named_modules() if n})
                path = q
            ort_model = OrtModel(path, threads)
            arr = x.numpy()
            t = time_interleaved({"m": lambda: ort_model.run_numpy(arr)}, min_iters=_MIN_ITERS, max_seconds=3.0)
    else:
        with torch.inference_mode():
            t = time_interleaved({"m": lambda: model(x)}, min_iters=_MIN_ITERS, max_seconds=3.0)
    return float(t["m"]["p50_ms"])
