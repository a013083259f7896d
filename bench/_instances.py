"""Scan tables written out for the solver benchmark: a deep residual CNN and a decoder-only LM.

The solver only sees the scan table: the layers (shapes, MACs), every state-dict tensor with the
channel groups that shrink each of its dims, and one row per probe. These builders write such tables
for architectures the bench cannot scan here (a 200-unit ResNet at 224 px; a 32-layer language model
with its heads, MLP width and group-wise bits). The couplings are the real ones of each
architecture: a residual stream shrinks every block's last conv, the next block's first conv and
the BatchNorms on it; a head group shrinks q, k and v rows and o columns by the head dimension.
The drops are random but grow with compression (seeded), so the instances are solvable and not
trivial; the timings say nothing about accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sensplan._effects import n_remove_for
from sensplan._tables import Scan

AXES = {"prune": ("group", "channels"), "weight_quant": ("layer", "weight"), "half": ("layer", "weight")}


class _Table:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.layers: dict[str, Any] = {}
        self.tensors: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.settings: dict[str, list[dict[str, Any]]] = {}

    def group(self, gid: str, channels: int, status: str = "scanned") -> None:
        self.groups[gid] = {"channels": channels, "members": [], "status": status,
                            "reason": "" if status == "scanned" else "output layer"}

    def layer(self, name: str, typ: str, shape: list[int], positions: int, out: str | None,
              inp: str | None, per_in: float = 1.0, per_out: float = 1.0, bias: bool = False) -> None:
        shrinks: dict[str, dict[str, float]] = {}
        if out is not None:
            shrinks.setdefault(out, {})["0"] = per_out
            self.groups[out]["members"].append([name, "out", typ])
        if inp is not None:
            shrinks.setdefault(inp, {})["1"] = per_in
            self.groups[inp]["members"].append([name, "in", typ])
        self.layers[name] = {"type": typ, "weight": f"{name}.weight", "weight_shape": shape,
                             "macs": int(np.prod(shape)) * positions, "bias": bias}
        self.tensor(f"{name}.weight", shape, shrinks, layer=name)
        if bias:
            self.tensor(f"{name}.bias", [shape[0]], {out: {"0": per_out}} if out else {})

    def tensor(self, key: str, shape: list[int], shrinks: dict[str, dict[str, float]], *,
               layer: str | None = None, kind: str = "parameter", bits: int = 32) -> None:
        self.tensors[key] = {"shape": shape, "storage_bits": bits, "kind": kind, "layer": layer,
                             "shrinks": shrinks}

    def norm(self, prefix: str, channels: int, group: str | None, buffers: bool = True) -> None:
        shrinks = {group: {"0": 1.0}} if group else {}
        for p in ("weight", "bias"):
            self.tensor(f"{prefix}.{p}", [channels], shrinks)
        if buffers:
            for b in ("running_mean", "running_var"):
                self.tensor(f"{prefix}.{b}", [channels], shrinks, kind="buffer")
            self.tensor(f"{prefix}.num_batches_tracked", [], {}, kind="buffer", bits=64)

    def results(self, ratios: Sequence[float], formats: Sequence[dict[str, Any]], half: bool) -> None:
        """One prune row per ratio per scanned group, one weight row per format per layer."""
        self.settings["prune"] = [{"ratio": float(r)} for r in ratios]
        for gid, g in self.groups.items():
            if g["status"] != "scanned":
                continue
            base = self.rng.uniform(0.01, 0.3)
            seen: set[int] = set()
            for r in ratios:
                k = n_remove_for(r, g["channels"])
                if k and k not in seen:
                    seen.add(k)
                    self.row(gid, "prune", {"ratio": float(r), "n_remove": k}, {"removed": k},
                             base * (4 * r) ** 2 + abs(self.rng.normal(0, 0.005)), f"prune {r:.0%}", k)
        self.settings["weight_quant"] = [dict(f) for f in formats]
        if half:
            self.settings["half"] = [{"dtype": "float16"}, {"dtype": "bfloat16"}]
        for name in self.layers:
            base = self.rng.uniform(0.0, 0.05)
            for f in formats:
                b = f["bits"]
                finer = 0.7 if f.get("group") else 1.0
                effect = {"weight_bits": b, "weight_dtype": "int", "scale_bits": 32,
                          **({"group_size": f["group"]} if f.get("group") else {}),
                          **({"zero_point_bits": b} if f.get("zero_point") else {})}
                drop = base * finer * (0.8 if f.get("zero_point") else 1.0) * 4.0 ** (8 - b) / 64
                self.row(name, "weight_quant", dict(f), effect, drop + abs(self.rng.normal(0, 0.001)),
                         f"int{b}", 32.0 - b)
            if half:
                for dt in ("float16", "bfloat16"):
                    self.row(name, "half", {"dtype": dt}, {"weight_bits": 16, "weight_dtype": dt},
                             abs(self.rng.normal(0, 0.0005)), dt, 16.0)

    def row(self, unit: str, method: str, setting: dict[str, Any], effect: dict[str, Any], drop: float,
            label: str, level: float) -> None:
        n = 1000
        flips = abs(round(drop * n))
        self.rows.append({
            "unit": unit, "method": method, "axis": AXES[method][1], "setting": setting, "label": label,
            "level": level, "effect": effect, "score": 0.9 - drop, "loss": 0.3 + 2 * drop, "drop": drop,
            "drop_se": float(np.sqrt(flips)) / n, "lost": flips, "gained": 0,
            "loss_increase": 2 * drop, "seconds": 0.0})

    def scan(self, input_shape: list[int], outputs: int) -> Scan:
        skipped = {"prune": {g: v["reason"] for g, v in self.groups.items() if v["status"] != "scanned"}}
        methods = {name: {"unit_kind": AXES[name][0], "axis": AXES[name][1], "stage": 0,
                          "structural": name == "prune", "description": name, "speed_note": "",
                          "settings": s, "skipped": skipped.get(name, {})}
                   for name, s in self.settings.items()}
        return Scan({
            "format": "sensplan.scan", "schema_version": 2, "provenance": {"seconds": 0.0},
            "model": {"spec": None, "architecture_digest": "written-out", "input_shape": input_shape,
                      "outputs": outputs},
            "data": {"spec": "none", "n": 1000},
            "task": {"name": "classification",
                     "metric": {"name": "top1", "higher_is_better": True, "unit": "fraction"}},
            "config": {"settings": self.settings, "task": "classification", "bn_recalibration": False},
            "calibration": None, "baseline": {"score": 0.9, "loss": 0.3, "n": 1000}, "methods": methods,
            "pruning_graph": {"available": True, "reason": ""},
            "layers": self.layers, "groups": self.groups, "tensors": self.tensors, "results": self.rows})


def weight_formats(bits: Sequence[int], groups: Sequence[int], zero_point: bool = True) -> list[dict[str, Any]]:
    """Every weight_quant setting: per channel and group-wise at each group size, symmetric and
    (with ``zero_point``) asymmetric."""
    out = []
    for b in bits:
        for g in (0, *groups):
            for zp in ((False, True) if zero_point else (False,)):
                out.append({"bits": b, **({"group": g} if g else {}), **({"zero_point": True} if zp else {})})
    return out


def residual_cnn(stages: Sequence[int] = (3, 4, 20, 3), options: int = 40, seed: int = 0,
                 group_options: int | None = None) -> Scan:
    """A bottleneck ResNet at 224 px (``stages`` blocks per stage; (3, 4, 23, 3) is ResNet-101),
    each unit with ``options`` options: channel groups ``options - 1`` pruning ratios (or
    ``group_options - 1``), layers ``options - 1`` weight formats (bits 2-8, per channel or
    group-wise, symmetric or not)."""
    t = _Table(seed)
    widths = [64, 128, 256, 512]
    spatial = [56, 28, 14, 7]
    t.group("stem", 64)
    t.layer("conv1", "Conv2d", [64, 3, 7, 7], 112 * 112, "stem", None)
    t.norm("bn1", 64, "stem")
    stream = "stem"
    cin = 64
    for s, (blocks, w, hw) in enumerate(zip(stages, widths, spatial, strict=True)):
        out = f"layer{s + 1}.stream"
        t.group(out, 4 * w)
        for b in range(blocks):
            p = f"layer{s + 1}.{b}"
            t.group(f"{p}.conv1", w)
            t.group(f"{p}.conv2", w)
            t.layer(f"{p}.conv1", "Conv2d", [w, cin, 1, 1], hw * hw, f"{p}.conv1", stream if b == 0 else out)
            t.norm(f"{p}.bn1", w, f"{p}.conv1")
            t.layer(f"{p}.conv2", "Conv2d", [w, w, 3, 3], hw * hw, f"{p}.conv2", f"{p}.conv1")
            t.norm(f"{p}.bn2", w, f"{p}.conv2")
            t.layer(f"{p}.conv3", "Conv2d", [4 * w, w, 1, 1], hw * hw, out, f"{p}.conv2")
            t.norm(f"{p}.bn3", 4 * w, out)
            if b == 0:
                t.layer(f"{p}.downsample.0", "Conv2d", [4 * w, cin, 1, 1], hw * hw, out, stream)
                t.norm(f"{p}.downsample.1", 4 * w, out)
            cin = 4 * w
        stream = out
    t.group("fc", 1000, status="skipped")
    t.layer("fc", "Linear", [1000, cin], 1, "fc", stream, bias=True)
    n = options - 1
    g = (group_options or options) - 1
    ratios = [round(0.8 * (i + 1) / g, 4) for i in range(g)]
    formats = weight_formats(range(2, 9), (32, 64, 128))[:n]
    t.results(ratios, formats, half=False)
    return t.scan([3, 224, 224], 1000)


def decoder_lm(layers: int = 32, hidden: int = 4096, heads: int = 32, mlp: int = 11008, vocab: int = 32000,
               seed: int = 0) -> Scan:
    """A Llama-style decoder (``layers`` blocks of q, k, v, o and a gated MLP, RMSNorms, tied nothing):
    per block a head group (one channel = one head: q, k, v rows and o columns by the head
    dimension), an MLP-width group (gate and up rows, down columns), and the weight format of each
    projection and of the LM head (bits 2-8 by 3 group sizes, symmetric or not, fp16 and bf16). The
    residual stream is not pruned (a real scan skips it)."""
    t = _Table(seed)
    head_dim = hidden // heads
    t.tensor("embed_tokens.weight", [vocab, hidden], {})
    for i in range(layers):
        p = f"layers.{i}"
        t.group(f"{p}.heads", heads)
        t.group(f"{p}.mlp", mlp)
        for proj in ("q_proj", "k_proj", "v_proj"):
            t.layer(f"{p}.self_attn.{proj}", "Linear", [hidden, hidden], 1, f"{p}.heads", None,
                    per_out=float(head_dim))
        t.layer(f"{p}.self_attn.o_proj", "Linear", [hidden, hidden], 1, None, f"{p}.heads", per_in=float(head_dim))
        for proj in ("gate_proj", "up_proj"):
            t.layer(f"{p}.mlp.{proj}", "Linear", [mlp, hidden], 1, f"{p}.mlp", None)
        t.layer(f"{p}.mlp.down_proj", "Linear", [hidden, mlp], 1, None, f"{p}.mlp")
        t.norm(f"{p}.input_layernorm", hidden, None, buffers=False)
        t.norm(f"{p}.post_attention_layernorm", hidden, None, buffers=False)
    t.layer("lm_head", "Linear", [vocab, hidden], 1, None, None)
    ratios = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
    formats = [f for f in weight_formats((2, 3, 4, 5, 6, 8), (32, 64, 128)) if f.get("group")]
    t.results(ratios, formats, half=True)
    return t.scan([128], vocab)
