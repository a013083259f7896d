"""The plan's weight-only integer Linear layers as ONNX Runtime ``MatMulNBits`` nodes, carrying the
plan's own codes, scales and zero points: one code path for ``sensplan apply --runtime
onnxruntime`` and ``sensplan export --to onnxruntime``.

``MatMulNBits`` (ORT's contrib op, domain ``com.microsoft``) multiplies float activations by a
constant weight stored as ``bits``-bit codes in blocks of ``block_size`` values along the input
features, one float scale (and optionally one zero point) per block: ``(code - zero point) *
scale``, with ``2**(bits-1)`` as the zero point when none is given. ORT 1.30's CPU kernel takes 2, 4
and 8 bits and a block size that is a power of two of at least 16 (checked by building the op).
sensplan's formats map onto it exactly:

- group-wise weights (``group_size`` 32, 64 or 128): ``block_size`` = the group size, groups run
  along a Linear weight's rows (its input features), as the blocks do;
- one scale per output channel: the scale repeated over every block of the row (``block_size``
  128, or the row's length rounded up to a power of two >= 16 when it is shorter);
- symmetric codes ``q`` are stored as ``q + 2**(bits-1)`` with no zero-point input; asymmetric codes
  and zero points are stored as they are (zero points packed like the codes).

The codes are the plan's: the weights the executor left (already on the plan's grid) are quantized
again with sensplan's own quantizer (:func:`sensplan.sensitivity._quant.quantize`), which returns
the same codes, scales and zero points, and :func:`apply_nbits` records the largest difference
between the weights ORT will compute with and the exported ones (0 when exact).

Only MatMul and Gemm nodes become MatMulNBits (a Gemm with its bias as the op's ``bias``); a Conv,
or a Gemm with ``alpha``/``beta``/``transA`` other than the defaults, stays float with the reason.

:func:`nbits_problem` and :func:`nbits_config` are torch-free; :func:`apply_nbits` imports torch
(sensplan's quantizer) when it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

#: the weight bits ORT's MatMulNBits CPU kernel takes (its schema: "supported values: 2, 4, 8")
NBITS_BITS = (2, 4, 8)
#: the layer types whose weighted node is a MatMul or Gemm in the exported graph
NBITS_LAYER_TYPES = ("Linear",)
#: the block size a per-output-channel format uses (its one scale repeated over the row's blocks)
PER_CHANNEL_BLOCK = 128
MS_DOMAIN = "com.microsoft"


def nbits_problem(effect: Mapping[str, Any]) -> str | None:
    """Why integer weights of ``effect`` (``weight_bits``, ``group_size``) cannot be a MatMulNBits
    node's; None when they can (the layer type is checked by the caller)."""
    bits = int(effect.get("weight_bits", 32))
    if bits not in NBITS_BITS:
        return (f"ONNX Runtime's weight-only kernel (MatMulNBits) takes {', '.join(map(str, NBITS_BITS))}-bit "
                f"weights, not {bits}-bit")
    g = int(effect.get("group_size") or 0)
    if g and (g < 16 or g & (g - 1)):
        return f"MatMulNBits takes groups of a power of two >= 16 values, not {g}"
    return None


def weight_only(effect: Mapping[str, Any]) -> bool:
    """Whether ``effect`` has integer weights MatMulNBits takes (whatever its activations)."""
    return effect.get("weight_dtype") == "int" and nbits_problem(effect) is None


def block_size_for(group_size: int, k: int) -> int:
    """MatMulNBits's block size for a weight of ``k`` input features: the group size, or for one
    scale per output channel :data:`PER_CHANNEL_BLOCK` (the row's length rounded up to a power of
    two >= 16 when shorter)."""
    if group_size:
        return group_size
    return PER_CHANNEL_BLOCK if k >= PER_CHANNEL_BLOCK else max(16, 1 << (k - 1).bit_length())


def nbits_config(graph: Any, effects: Mapping[str, Mapping[str, Any]], nodes: Mapping[str, tuple[str, str, str]],
                 *, unit_of: Callable[[str], str] = lambda s: s) -> dict[str, Any]:
    """Which weighted nodes of ``graph`` become MatMulNBits (plain data, JSON-able): ``layers``:
    unit -> {node, op, bits, group_size, block_size, symmetric, K, N}; ``float_layers``: unit -> why
    it stays float; ``notes``. ``effects``: the plan's merged effect per unit, of the layers whose
    integer weights are MatMulNBits's (the caller picks them); ``nodes``: module -> (node, op, input)
    (:func:`~sensplan.planner._ort_quant.layer_nodes`)."""
    by_name = {n.name: n for n in graph.node}
    layers: dict[str, dict[str, Any]] = {}
    float_layers: dict[str, str] = {}
    notes: list[str] = []
    for module, (node_name, op, _x) in nodes.items():
        unit = unit_of(module)
        e = effects.get(unit)
        if e is None:
            continue
        if module not in (unit, f"{unit}.0") or unit in layers:
            float_layers[unit] = "float: a layer split into several nodes is not rewritten as MatMulNBits"
            layers.pop(unit, None)
            continue
        node = by_name[node_name]
        why = _node_problem(node, op)
        if why:
            float_layers[unit] = why
            continue
        w = _weight(graph, node)
        if w is None:
            float_layers[unit] = "float: the node's weight is not a constant MatMulNBits can take"
            continue
        n_out, k = w.shape
        g = int(e.get("group_size") or 0)
        layers[unit] = {"node": node_name, "op": op, "bits": int(e["weight_bits"]), "group_size": g,
                        "block_size": block_size_for(g, k), "symmetric": not int(e.get("zero_point_bits") or 0),
                        "K": int(k), "N": int(n_out)}
        if int(e.get("act_bits", 32)) < 32:
            notes.append(f"{unit}: its {int(e['act_bits'])}-bit activations run in float (MatMulNBits takes float "
                         f"input; ORT's integer kernels need 8-bit per-channel symmetric weights)")
    for unit in effects:
        if unit not in layers and unit not in float_layers:
            float_layers[unit] = "float: the layer has no weighted node in the exported graph"
    return {"layers": layers, "float_layers": float_layers, "notes": notes}


def _node_problem(node: Any, op: str) -> str | None:
    if op == "MatMul":
        return None
    if op == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        if any(attrs[k].f != 1.0 for k in ("alpha", "beta") if k in attrs) or \
                ("transA" in attrs and attrs["transA"].i):
            return "float: a Gemm with alpha, beta or transA set has no MatMulNBits form"
        return None
    return (f"float: no ONNX Runtime kernel computes with integer weights of a {op} without 8-bit activations "
            f"(MatMulNBits replaces MatMul only)")


def _weight(graph: Any, node: Any) -> np.ndarray | None:
    """The constant weight of a MatMul or Gemm node as a Linear's [out, in] (float32), following a
    Transpose between the initializer and the node; None when it is not a 2-D constant."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    name = node.input[1]
    perm: list[int] | None = None
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None and producer.op_type in ("Transpose", "Identity") and producer.input[0] in inits:
        name = producer.input[0]
        if producer.op_type == "Transpose":
            p = next((list(a.ints) for a in producer.attribute if a.name == "perm"), [1, 0])
            perm = p
    if name not in inits:
        return None
    b = numpy_helper.to_array(inits[name]).astype(np.float32)
    if b.ndim != 2:
        return None
    if perm is not None:
        b = b.transpose(perm)
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        b = b.T
    return np.ascontiguousarray(b.T)  # B is [in, out]: the Linear's weight is its transpose


def _pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (..., n) packed ``8 // bits`` to a byte along the last axis, lowest bits first
    (n a multiple of ``8 // bits``)."""
    per = 8 // bits
    u = u.astype(np.uint8).reshape(*u.shape[:-1], u.shape[-1] // per, per)
    out = np.zeros(u.shape[:-1], np.uint8)
    for j in range(per):
        out |= (u[..., j] << (bits * j)).astype(np.uint8)
    return out


def nbits_tensors(w: np.ndarray, bits: int, group_size: int, symmetric: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """MatMulNBits's ``B`` (uint8 [N, blocks, blob]), ``scales`` (float32 [N, blocks]) and packed
    ``zero_points`` (uint8 [N, ceil(blocks * bits / 8)], None when symmetric) for a Linear weight
    ``w`` [N, K] on sensplan's grid, with sensplan's own quantizer; and the largest absolute
    difference between the weights they encode and ``w`` (0.0 when ``w`` was on the grid)."""
    import torch

    from sensplan.sensitivity import QFormat, dequantize_codes, quantize

    n, k = w.shape
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    q, s, z = quantize(wt, QFormat(bits, group_size, not symmetric))
    diff = float((dequantize_codes(q, s, z, group_size) - wt).abs().max()) if w.size else 0.0
    bs = block_size_for(group_size, k)
    blocks = -(-k // bs)
    half = 1 << (bits - 1)
    scales = s.float().numpy().reshape(n, -1)
    if not group_size:  # one scale (and zero point) per row: repeated over its blocks
        scales = np.repeat(scales, blocks, axis=1)
    codes = q.numpy().astype(np.int32)
    if symmetric:
        codes, zeros = codes + half, None
        pad_value = np.full((n, 1), half)
    else:
        zeros = z.numpy().astype(np.int32).reshape(n, -1)  # type: ignore[union-attr]
        if not group_size:
            zeros = np.repeat(zeros, blocks, axis=1)
        pad_value = zeros[:, -1:]
    full = np.empty((n, blocks * bs), np.int32)
    full[:, :k] = codes
    full[:, k:] = pad_value  # a short last block: padding decodes to 0 (the kernel reads K values only)
    b = _pack(full.reshape(n, blocks, bs), bits)
    zp = None
    if zeros is not None:
        per = 8 // bits
        zfull = np.zeros((n, -(-blocks // per) * per), np.int32)
        zfull[:, :blocks] = zeros
        zp = _pack(zfull, bits)
    return b, np.ascontiguousarray(scales, dtype=np.float32), zp, diff


def matmul_nbits(x: str, outputs: list[str], w: np.ndarray, bits: int, group_size: int, symmetric: bool,
                 base: str, bias: str | None = None, name: str | None = None) -> tuple[Any, list[Any], float]:
    """One MatMulNBits node computing ``x @ w.T`` (``w``: [N, K]) with ``bias`` (an input name, or
    None) added: (the node, its initializers ``{base}.B``, ``.scales`` and ``.zero_points``, the
    largest weight change quantization made)."""
    from onnx import helper, numpy_helper

    b, scales, zp, diff = nbits_tensors(w, bits, group_size, symmetric)
    inits = [numpy_helper.from_array(b, f"{base}.B"), numpy_helper.from_array(scales, f"{base}.scales")]
    inputs = [x, f"{base}.B", f"{base}.scales"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, f"{base}.zero_points"))
        inputs.append(f"{base}.zero_points")
    if bias:
        inputs += [""] * (5 - len(inputs)) + [bias]  # zero_points, g_idx, then bias
    node = helper.make_node("MatMulNBits", inputs, outputs, name=name, domain=MS_DOMAIN, K=w.shape[1],
                            N=w.shape[0], bits=bits, block_size=block_size_for(group_size, w.shape[1]))
    return node, inits, diff


def apply_nbits(src: str | os.PathLike[str], dst: str | os.PathLike[str], config: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``dst``: ``src`` with each node of ``config["layers"]`` (:func:`nbits_config`) replaced
    by a MatMulNBits node carrying the plan's codes, scales and zero points (a Gemm's bias becomes
    the op's bias); the float weights they replace, and Transposes only they used, are removed.
    Returns per unit the node's format and ``weight_max_abs_diff`` (the largest difference between
    the weights ORT computes with and the exported float ones), and the layers left float (a node
    not found in ``src``, with why)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(os.fspath(src))
    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    done: dict[str, dict[str, Any]] = {}
    float_layers: dict[str, str] = {}
    for unit, spec in (config.get("layers") or {}).items():
        inits: list[Any] = []
        node = by_name.get(spec["node"])
        w = None if node is None else _weight(graph, node)
        if node is None or w is None:
            float_layers[unit] = f"float: node {spec['node']} is not in the quantized graph"
            continue
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        c = _constant(graph, bias) if bias else None
        if bias and (c is None or c.size != w.shape[0]):  # MatMulNBits adds a bias of exactly [N]
            float_layers[unit] = (f"float: the Gemm's bias {bias!r} is not a constant of {w.shape[0]} values "
                                  f"(MatMulNBits takes a bias of shape [N])")
            continue
        bits, bs = int(spec["bits"]), int(spec["block_size"])
        base = f"{spec['node']}.nbits"
        if c is not None and c.shape != (w.shape[0],):  # a [1, N] bias, which Gemm broadcasts
            inits.append(numpy_helper.from_array(c.reshape(-1), f"{base}.bias"))
            bias = f"{base}.bias"
        new, more, diff = matmul_nbits(node.input[0], list(node.output), w, bits, int(spec["group_size"]),
                                       bool(spec["symmetric"]), base, bias, name=spec["node"])
        inits += more
        idx = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(idx, new)
        graph.initializer.extend(inits)
        done[unit] = {"node": spec["node"], "bits": bits, "block_size": bs, "symmetric": bool(spec["symmetric"]),
                      "weight_max_abs_diff": diff}
    if done:
        _prune_unused(graph)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(model, os.fspath(dst))
    return {"layers": done, "float_layers": float_layers}


def _constant(graph: Any, name: str) -> np.ndarray | None:
    """The value of initializer ``name`` (None for a computed tensor)."""
    from onnx import numpy_helper

    init = next((i for i in graph.initializer if i.name == name), None)
    return None if init is None else numpy_helper.to_array(init)


def _prune_unused(graph: Any) -> None:
    """Remove the nodes whose outputs nothing reads (the weight Transposes a rewrite left behind)
    and the initializers nothing reads, repeatedly."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.output and not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    used = {i for n in graph.node for i in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)

