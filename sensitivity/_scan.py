"""The sensitivity scan: perturb one unit at a time, evaluate, restore; write the table.

Units:
- every Conv/Linear layer, for weight quantization at each of ``ScanConfig.bits``;
- every channel group (Torch-Pruning DependencyGraph), for structured pruning at each of
  ``ScanConfig.ratios``, with the executor's channel-selection criterion.

Each probe is reversible: after :func:`scan` the model's state dict is bit-identical to before.
A ``drop`` is ``baseline top-1 - probe top-1`` (a fraction; positive = worse); ``loss_increase``
is ``probe loss - baseline loss`` (nats).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sensplan._artifacts import file_sha256, now_iso, read_json, versions, write_json
from sensplan._errors import ArtifactError, InternalError, UserInputError
from sensplan.sensitivity._data import EvalSet
from sensplan.sensitivity._eval import (
    batchnorm_state_restored,
    batchnorm_statistics,
    evaluate,
    paired_drop_se,
    recalibrate_batchnorm_,
)
from sensplan.sensitivity._groups import (
    CRITERION,
    QUANTIZABLE,
    PruningGraph,
    check_group,
    count_macs,
    n_remove_for,
)
from sensplan.sensitivity._models import ModelSpec, architecture_digest
from sensplan.sensitivity._quant import SUPPORTED_BITS, fake_quantize

SCAN_FORMAT = "sensplan.scan"
SCAN_SCHEMA_VERSION = 1
QUANT_METHOD = "per_channel_symmetric_mse_clip"


@dataclass(frozen=True)
class ScanConfig:
    """What to scan: weight ``bits`` and pruning ``ratios`` (fraction of a group's channels removed).

    Example: ``ScanConfig(bits=(8, 4), ratios=(0.25, 0.5))``.
    """

    bits: tuple[int, ...] = (8, 6, 4, 3, 2)
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    batch_size: int = 500
    check_samples: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(sorted(set(int(b) for b in self.bits), reverse=True)))
        object.__setattr__(self, "ratios", tuple(sorted(set(float(r) for r in self.ratios))))
        for b in self.bits:
            if b not in SUPPORTED_BITS:
                raise UserInputError(f"The 'bits' parameter of ScanConfig must hold values in "
                                     f"{SUPPORTED_BITS}. Got {b} instead.")
        for r in self.ratios:
            if not 0.0 < r < 1.0:
                raise UserInputError(f"The 'ratios' parameter of ScanConfig must hold floats in the range "
                                     f"(0.0, 1.0). Got {r} instead.")
        if self.batch_size <= 0:
            raise UserInputError(f"The 'batch_size' parameter must be positive. Got {self.batch_size}.")

    def to_dict(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "ratios": list(self.ratios), "batch_size": self.batch_size,
                "check_samples": self.check_samples}


@dataclass(frozen=True)
class Scan:
    """The scan table (``scan.json``): baseline, units, their measured drops, cost structure, provenance.

    Plain data keyed by module FQN; see docs/formats.md for every field.
    """

    data: Mapping[str, Any]
    sha256: str = ""
    path: str = ""

    # convenient views -----------------------------------------------------------------------------
    @property
    def baseline(self) -> Mapping[str, Any]:
        return self.data["baseline"]  # type: ignore[no-any-return]

    @property
    def layers(self) -> Mapping[str, Any]:
        return self.data["layers"]  # type: ignore[no-any-return]

    @property
    def groups(self) -> Mapping[str, Any]:
        return self.data["groups"]  # type: ignore[no-any-return]

    @property
    def tensors(self) -> Mapping[str, Any]:
        return self.data["tensors"]  # type: ignore[no-any-return]

    @property
    def results(self) -> Sequence[Mapping[str, Any]]:
        return self.data["results"]  # type: ignore[no-any-return]

    def scanned_groups(self) -> list[str]:
        return [g for g, v in self.groups.items() if v["status"] == "scanned"]

    def skipped_groups(self) -> dict[str, str]:
        return {g: v["reason"] for g, v in self.groups.items() if v["status"] == "skipped"}

    def results_for(self, unit: str, kind: str) -> list[Mapping[str, Any]]:
        return [r for r in self.results if r["unit"] == unit and r["kind"] == kind]

    def save(self, path: str | os.PathLike[str]) -> Scan:
        digest = write_json(path, dict(self.data))
        return Scan(self.data, digest, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scan:
        obj = read_json(path, SCAN_FORMAT, (SCAN_SCHEMA_VERSION,))
        for key in ("baseline", "layers", "groups", "tensors", "results"):
            if key not in obj:
                raise ArtifactError(f"{str(path)!r} lacks the {key!r} section of a scan. Re-run `sensplan scan`.")
        return cls(obj, file_sha256(path), str(path))


def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="scan", unit="probe", disable=None if enabled is None else not enabled,
                dynamic_ncols=True, leave=True)


def describe_model(model: nn.Module, graph: PruningGraph, example_input: torch.Tensor) -> tuple[
        dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The static structure the planner's cost model needs: layers, groups, tensors (no results)."""
    macs = count_macs(model, example_input)
    modules = dict(model.named_modules())
    layers: dict[str, Any] = {}
    for name, mod in modules.items():
        if isinstance(mod, QUANTIZABLE) and name in macs:
            layers[name] = {"type": type(mod).__name__, "weight": f"{name}.weight",
                            "weight_shape": list(mod.weight.shape), "macs": int(macs[name]),
                            "bias": mod.bias is not None}
    weight_of = {v["weight"]: k for k, v in layers.items()}
    params = {n for n, _ in model.named_parameters()}
    tensors = {k: {"shape": list(v.shape), "storage_bits": v.element_size() * 8,
                   "kind": "parameter" if k in params else "buffer",
                   "layer": weight_of.get(k), "shrinks": {}}
               for k, v in model.state_dict().items()}
    groups = {gid: {"channels": graph.channels(gid),
                    "members": [[m.module, m.side, m.kind] for m in graph.members(gid)],
                    "status": "pending", "reason": ""}
              for gid in graph.group_ids()}
    return layers, groups, tensors


def scan(model: nn.Module, data: EvalSet, config: ScanConfig | None = None, *,
         calib: EvalSet | None = None, model_spec: ModelSpec | None = None, weights: str | None = None,
         prune: bool = True, quantize: bool = True, progress: bool | None = None) -> Scan:
    """Measure the accuracy drop of every (unit, setting) on ``data``; return the table (unsaved).

    With ``calib`` (calibration data, ideally disjoint from ``data``), every probe recalibrates the
    BatchNorm statistics as the executor will (``recalibrate_batchnorm_``) before evaluating.
    ``model`` is evaluated in eval mode and restored after every probe: its state dict is
    bit-identical afterwards. Example::

        table = scan(model, load_eval_set(DataSpec.parse("digits")), ScanConfig(bits=(8, 4)))
        table.save("scan.json")
    """
    cfg = config or ScanConfig()
    started, t0 = now_iso(), time.perf_counter()
    was_training = model.training
    model.eval()
    example = data.example_input
    base = evaluate(model, data, cfg.batch_size, per_sample=True)
    graph = PruningGraph(model, example)
    layers, groups, tensors = describe_model(model, graph, example)
    check_inputs = data.x[: max(1, cfg.check_samples)]

    # Which groups are safe, and what each ratio removes (distinct, non-empty channel counts only).
    plans: dict[str, list[tuple[float, int]]] = {}
    if prune and cfg.ratios:
        for gid, g in groups.items():
            settings: list[tuple[float, int]] = []
            for r in cfg.ratios:
                k = n_remove_for(r, g["channels"])
                if k > 0 and all(k != k0 for _, k0 in settings):
                    settings.append((r, k))
            if not settings:
                g.update(status="skipped", reason=f"only {g['channels']} channel(s): no scanned ratio "
                                                  f"removes a channel while keeping one.")
                continue
            chk = check_group(model, graph, gid, settings[-1][1], check_inputs)
            if not chk.ok:
                g.update(status="skipped", reason=chk.reason)
                continue
            g.update(status="scanned")
            for key, dims in chk.shrinks.items():
                tensors[key]["shrinks"][gid] = dims
            plans[gid] = settings
    else:
        for g in groups.values():
            g.update(status="skipped", reason="pruning was not scanned (--no-prune).")

    q_layers = list(layers) if quantize else []
    total = sum(len(s) for s in plans.values()) + len(q_layers) * len(cfg.bits)
    results: list[dict[str, Any]] = []
    module = dict(model.named_modules())

    reference = batchnorm_statistics(model, calib) if calib is not None else {}

    def record(unit: str, kind: str, setting: dict[str, Any], t_start: float) -> None:
        with batchnorm_state_restored(model):
            recalibrate_batchnorm_(model, calib, reference)
            ev = evaluate(model, data, cfg.batch_size, per_sample=True)
        if base.correct is None or ev.correct is None:  # pragma: no cover - per_sample=True above
            raise InternalError("evaluate(per_sample=True) returned no per-sample results")
        lost, gained, se = paired_drop_se(base.correct, ev.correct)
        results.append({"unit": unit, "kind": kind, **setting, "top1": ev.top1, "loss": ev.loss,
                        "drop": base.top1 - ev.top1, "drop_se": se, "lost": lost, "gained": gained,
                        "loss_increase": ev.loss - base.loss,
                        "seconds": round(time.perf_counter() - t_start, 4)})

    with _progress(total, progress) as bar:
        for gid, settings in plans.items():
            for ratio, k in settings:
                bar.set_postfix_str(f"prune {gid} {ratio:.2f}", refresh=False)
                t = time.perf_counter()
                # the executor's own choice of channels (PruningGraph.select)
                with graph.zeroed(gid, graph.select(gid, k)):
                    record(gid, "prune", {"ratio": ratio, "n_remove": k}, t)
                bar.update(1)
        for name in q_layers:
            w = module[name].weight
            original = w.detach().clone()
            for b in cfg.bits:
                bar.set_postfix_str(f"quantize {name} {b}b", refresh=False)
                t = time.perf_counter()
                with torch.no_grad():
                    w.copy_(fake_quantize(original, b))
                try:
                    record(name, "quantize", {"bits": b}, t)
                finally:
                    with torch.no_grad():
                        w.copy_(original)
                bar.update(1)
    model.train(was_training)

    spec = model_spec.to_dict() if model_spec else None
    table = {
        "format": SCAN_FORMAT,
        "schema_version": SCAN_SCHEMA_VERSION,
        "provenance": {"started": started, "seconds": round(time.perf_counter() - t0, 3),
                       "versions": versions(), "torch_threads": torch.get_num_threads()},
        "model": {"spec": spec, "weights": weights,
                  "weights_sha256": file_sha256(weights) if weights else None,
                  "architecture_digest": architecture_digest(model),
                  "input_shape": list(example.shape[1:]),
                  "num_classes": int(base_logits_classes(model, example))},
        "data": data.description,
        "config": {**cfg.to_dict(), "prune": prune, "quantize": quantize,
                   "prune_criterion": CRITERION, "quant_method": QUANT_METHOD,
                   "bn_recalibration": bool(reference)},
        "calibration": calib.description if calib is not None and reference else None,
        "baseline": base.to_dict(),
        "layers": layers,
        "groups": groups,
        "tensors": tensors,
        "results": results,
    }
    return Scan(table)


def base_logits_classes(model: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(example).shape[-1])
