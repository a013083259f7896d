"""Hand-built scan tables (schema v2) for planner tests: pure numpy, no model, solved in ms.

The table describes a small conv net without building it:

- ``l0 .. l{n_layers-1}``: a chain of 3x3 convs (16 output positions each). Layer ``i`` roots the
  channel group ``l{i}`` when ``i < n_groups`` and reads the group of the layer before it;
- ``cat`` (``concat=True``, at least two groups): a 1x1 conv reading the concatenation of the
  outputs of ``l0`` and ``l1``, so dim 1 of its weight shrinks with *two* groups (additively);
- ``fc``: a Linear head over the last conv's output flattened at 4 positions per channel (its
  input dim shrinks by 4 per removed channel when the last conv roots a group). Its own group is
  skipped, as a real scan skips the classifier.

Every conv has a bias and a BatchNorm (a parameter, a running-mean buffer and a scalar int64
counter), so the cost model also sees tensors that are not layer weights.

Results: group options on the ``channels`` axis (``prune``), and layer options on the ``weight``
axis (``weight_quant`` at ``bits``, ``half`` float16), the ``sparsity`` axis (``sparsity`` at
``sparsity`` ratios and ``sparsity_2_4``) and the ``activation`` axis (``act_quant``) on the layers
listed for each. Drops are random but grow with compression, with noise that sometimes breaks
monotonicity (the planner's envelope must repair it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sensplan._effects import n_remove_for
from sensplan._tables import Scan

CLASSES = 4
POSITIONS = 16  # output positions of every conv
FLATTEN = 4  # positions per channel where the last conv's output feeds the head

#: method name -> (unit_kind, axis), as the registry declares them
METHOD_AXES = {"prune": ("group", "channels"), "weight_quant": ("layer", "weight"),
               "half": ("layer", "weight"), "sparsity": ("layer", "sparsity"),
               "sparsity_2_4": ("layer", "sparsity"), "act_quant": ("layer", "activation")}


def _effect(method: str, setting: dict[str, Any]) -> dict[str, Any]:
    if method == "prune":
        return {"removed": setting["n_remove"]}
    if method == "weight_quant":
        return {"weight_bits": setting["bits"], "weight_dtype": "int", "scale_bits": 32}
    if method == "half":
        return {"weight_bits": 16, "weight_dtype": setting["dtype"]}
    if method == "sparsity":
        return {"density": 1.0 - setting["ratio"], "sparse_format": "auto"}
    if method == "sparsity_2_4":
        return {"density": 0.5, "sparse_format": "nm", "nm": [2, 4]}
    return {"act_bits": setting["bits"]}


def _label_level(method: str, s: dict[str, Any]) -> tuple[str, float]:
    if method == "prune":
        return f"prune {s['ratio']:.0%} ({s['n_remove']} ch)", float(s["n_remove"])
    if method == "weight_quant":
        return f"int{s['bits']}", 32.0 - s["bits"]
    if method == "half":
        return "fp16", 0.0
    if method == "sparsity":
        return f"sparse {s['ratio']:.0%}", float(s["ratio"])
    if method == "sparsity_2_4":
        return "2:4", 0.5
    return f"act{s['bits']} minmax", 32.0 - s["bits"]


def synthetic_scan(n_groups: int = 2, n_layers: int = 3, ratios: Sequence[float] = (0.25, 0.5),
                   bits: Sequence[int] = (8, 4), seed: int = 0, channels: int = 8, *,
                   concat: bool = True, sparsity: Sequence[float] = (0.5,),
                   sparse_layers: Sequence[str] = ("cat",), nm_layers: Sequence[str] = (),
                   half_layers: Sequence[str] = (), act_layers: Sequence[str] = ()) -> Scan:
    """A schema-v2 scan table of the net described in the module docstring (see there)."""
    if not 0 <= n_groups <= n_layers:
        raise ValueError(f"n_groups must be in [0, n_layers]. Got {n_groups} of {n_layers}.")
    rng = np.random.default_rng(seed)
    groups: dict[str, Any] = {}
    layers: dict[str, Any] = {}
    tensors: dict[str, Any] = {}

    def tensor(key: str, shape: list[int], shrinks: dict[str, dict[str, float]], *,
               layer: str | None = None, kind: str = "parameter", bits: int = 32) -> None:
        tensors[key] = {"shape": shape, "storage_bits": bits, "kind": kind, "layer": layer,
                        "shrinks": shrinks}

    def add_layer(name: str, typ: str, shape: list[int], positions: int,
                  shrinks: dict[str, dict[str, float]]) -> None:
        layers[name] = {"type": typ, "weight": f"{name}.weight", "weight_shape": shape,
                        "macs": int(np.prod(shape)) * positions, "bias": True}
        tensor(f"{name}.weight", shape, shrinks, layer=name)
        out = {g: {"0": d["0"]} for g, d in shrinks.items() if "0" in d}
        tensor(f"{name}.bias", [shape[0]], out)

    for i in range(n_layers):
        cin = 3 if i == 0 else channels
        shrinks: dict[str, dict[str, float]] = {}
        if i < n_groups:
            shrinks[f"l{i}"] = {"0": 1.0}
            groups[f"l{i}"] = {"channels": channels, "members": [[f"l{i}", "out", "Conv2d"]],
                               "status": "scanned", "reason": ""}
        if 0 < i <= n_groups:
            shrinks.setdefault(f"l{i - 1}", {})["1"] = 1.0
            groups[f"l{i - 1}"]["members"].append([f"l{i}", "in", "Conv2d"])
        add_layer(f"l{i}", "Conv2d", [channels, cin, 3, 3], POSITIONS, shrinks)
        out = {g: {"0": 1.0} for g, d in shrinks.items() if "0" in d}
        tensor(f"bn{i}.weight", [channels], out)
        tensor(f"bn{i}.running_mean", [channels], out, kind="buffer")
        tensor(f"bn{i}.num_batches_tracked", [], {}, kind="buffer", bits=64)
    if concat and n_groups >= 2:
        add_layer("cat", "Conv2d", [channels, 2 * channels, 1, 1], POSITIONS,
                  {"l0": {"1": 1.0}, "l1": {"1": 1.0}})
        for g in ("l0", "l1"):
            groups[g]["members"].append(["cat", "in", "Conv2d"])
    last = f"l{n_layers - 1}"
    head_shrinks = {last: {"1": float(FLATTEN)}} if last in groups else {}
    add_layer("fc", "Linear", [CLASSES, channels * FLATTEN], 1, head_shrinks)
    if last in groups:
        groups[last]["members"].append(["fc", "in", "Linear"])
    groups["fc"] = {"channels": CLASSES, "members": [["fc", "out", "Linear"]],
                    "status": "skipped", "reason": "output layer"}

    settings: dict[str, list[dict[str, Any]]] = {}
    rows: list[tuple[str, str, dict[str, Any], float]] = []
    for gid in [g for g, v in groups.items() if v["status"] == "scanned"]:
        base = rng.uniform(0.01, 0.2)
        seen = set()
        for r in ratios:
            k = n_remove_for(r, channels)
            if k == 0 or k in seen:
                continue
            seen.add(k)
            rows.append((gid, "prune", {"ratio": float(r), "n_remove": k},
                         base * r * 4 + rng.normal(0, 0.01)))
        settings["prune"] = [{"ratio": float(r)} for r in ratios]
    for layer in layers:
        base = rng.uniform(0.0, 0.05)
        for b in bits:
            rows.append((layer, "weight_quant", {"bits": int(b)},
                         base * (8 / b) ** 2 / 4 + rng.normal(0, 0.002)))
        if bits:
            settings["weight_quant"] = [{"bits": int(b)} for b in bits]
        if layer in half_layers:
            rows.append((layer, "half", {"dtype": "float16"}, abs(rng.normal(0, 0.001))))
            settings["half"] = [{"dtype": "float16"}]
        if layer in sparse_layers:
            for r in sparsity:
                rows.append((layer, "sparsity", {"ratio": float(r)},
                             base * r * 2 + rng.normal(0, 0.003)))
            if sparsity:
                settings["sparsity"] = [{"ratio": float(r)} for r in sparsity]
        if layer in nm_layers:
            rows.append((layer, "sparsity_2_4", {"pattern": "2:4"}, base + rng.normal(0, 0.003)))
            settings["sparsity_2_4"] = [{"pattern": "2:4"}]
        if layer in act_layers:
            rows.append((layer, "act_quant", {"calib": "minmax", "bits": 8},
                         abs(rng.normal(0, 0.004))))
            settings["act_quant"] = [{"calib": "minmax", "bits": 8}]

    n = 1000
    results = []
    for unit, method, setting, drop in rows:
        label, level = _label_level(method, setting)
        flips = abs(round(drop * n))
        results.append({
            "unit": unit, "method": method, "axis": METHOD_AXES[method][1], "setting": setting,
            "label": label, "level": level, "effect": _effect(method, setting),
            "score": 0.9 - drop, "loss": 0.3 + 2 * drop, "drop": drop,
            "drop_se": float(np.sqrt(flips)) / n, "lost": flips if drop > 0 else 0,
            "gained": flips if drop < 0 else 0, "loss_increase": 2 * drop, "seconds": 0.01})
    skipped = {"prune": {"fc": "output layer"}}
    methods = {name: {"unit_kind": METHOD_AXES[name][0], "axis": METHOD_AXES[name][1],
                      "stage": 0, "structural": name == "prune", "description": name,
                      "speed_note": "", "settings": s, "skipped": skipped.get(name, {})}
               for name, s in settings.items()}
    data = {
        "format": "sensplan.scan", "schema_version": 2,
        "provenance": {"seconds": 0.0},
        "model": {"spec": None, "architecture_digest": "synthetic", "input_shape": [3, 4, 4],
                  "outputs": CLASSES},
        "data": {"spec": "synthetic", "n": n},
        "task": {"name": "classification",
                 "metric": {"name": "top1", "higher_is_better": True, "unit": "fraction"}},
        "config": {"settings": settings, "task": "classification", "bn_recalibration": False},
        "calibration": None,
        "baseline": {"score": 0.9, "loss": 0.3, "n": n},
        "methods": methods,
        "pruning_graph": {"available": True, "reason": ""},
        "layers": layers, "groups": groups, "tensors": tensors, "results": results,
    }
    return Scan(data)
