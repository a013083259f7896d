"""Hand-built scan tables for planner tests: no model, milliseconds to solve."""

from __future__ import annotations

import numpy as np

from sensplan.sensitivity import Scan


def synthetic_scan(n_groups: int = 2, n_layers: int = 3, ratios=(0.25, 0.5), bits=(8, 4), seed: int = 0,
                   channels: int = 8) -> Scan:
    """A conv chain l0..l{n-1}: layer i writes group g{i} (if i < n_groups) and reads group g{i-1}.
    Drops are random but grow with compression, with noise that sometimes breaks monotonicity."""
    rng = np.random.default_rng(seed)
    groups, layers, tensors, results = {}, {}, {}, []
    for i in range(n_groups):
        groups[f"l{i}"] = {"channels": channels, "members": [[f"l{i}", "out", "Conv2d"]], "status": "scanned",
                           "reason": ""}
    groups["head"] = {"channels": 4, "members": [], "status": "skipped", "reason": "output layer"}
    for i in range(n_layers):
        cin = 3 if i == 0 else channels
        shape = [channels, cin, 3, 3]
        shrinks = {}
        if i < n_groups:
            shrinks[f"l{i}"] = [0]
        if 0 < i <= n_groups:
            shrinks[f"l{i - 1}"] = [1]
        layers[f"l{i}"] = {"type": "Conv2d", "weight": f"l{i}.weight", "weight_shape": shape,
                           "macs": int(np.prod(shape)) * 16, "bias": True}
        tensors[f"l{i}.weight"] = {"shape": shape, "storage_bits": 32, "kind": "parameter", "layer": f"l{i}",
                                   "shrinks": shrinks}
        tensors[f"l{i}.bias"] = {"shape": [channels], "storage_bits": 32, "kind": "parameter", "layer": None,
                                 "shrinks": {k: [0] for k, v in shrinks.items() if v == [0]}}
        tensors[f"bn{i}.running_mean"] = {"shape": [channels], "storage_bits": 32, "kind": "buffer",
                                          "layer": None, "shrinks": {k: [0] for k, v in shrinks.items() if v == [0]}}
    for gid in list(groups)[:n_groups]:
        base = rng.uniform(0.01, 0.2)
        for r in ratios:
            drop = base * r * 4 + rng.normal(0, 0.01)
            results.append({"unit": gid, "kind": "prune", "ratio": r, "n_remove": int(round(r * channels)),
                            "top1": 0.9 - drop, "loss": 0.3 + drop, "drop": drop, "loss_increase": drop * 2})
    for layer in layers:
        base = rng.uniform(0.0, 0.05)
        for b in bits:
            drop = base * (8 / b) ** 2 / 4 + rng.normal(0, 0.002)
            results.append({"unit": layer, "kind": "quantize", "bits": b, "top1": 0.9 - drop, "loss": 0.3 + drop,
                            "drop": drop, "loss_increase": drop * 2})
    data = {"format": "sensplan.scan", "schema_version": 1, "provenance": {}, "model": {"spec": None},
            "data": {"spec": "synthetic"}, "config": {}, "baseline": {"top1": 0.9, "loss": 0.3, "n": 1000},
            "layers": layers, "groups": groups, "tensors": tensors, "results": results}
    return Scan(data)
