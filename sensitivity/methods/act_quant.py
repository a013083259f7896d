"""Integer activation quantization per layer input (per tensor, affine, calibrated).

Setting: ``calib`` ("minmax" or "percentile": the 0.01% and 99.99% quantiles) at ``bits`` (8). The
range is measured once on calibration data (the BatchNorm calibration set, else the evaluation
data) with the model as it is when the method runs, always including 0; the layer's input is then
rounded to ``2**bits`` levels (scale and zero point), as an int8 runtime (ONNX Runtime QDQ) would.
BOPs use the chosen activation bits. In PyTorch this is simulated (fake quantization).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sensplan.sensitivity._quant import act_qparams, install_input_quant
from sensplan.sensitivity.methods import METHODS, Method, MethodContext, Setting, UnitInfo

_CALIBS = ("minmax", "percentile")
_SAMPLE = 200_000  # values kept per layer for the percentile estimate


@torch.no_grad()
def activation_ranges(model: nn.Module, layers: Sequence[str], x: torch.Tensor,
                      batch_size: int = 128) -> dict[str, dict[str, float]]:
    """Min, max and the 0.01%/99.99% quantiles of every layer's input over ``x``."""
    mods = {n: model.get_submodule(n) for n in layers}
    stats: dict[str, dict[str, Any]] = {n: {"min": float("inf"), "max": float("-inf"), "sample": []}
                                        for n in layers}
    g = torch.Generator().manual_seed(0)

    def hook(name: str) -> Any:
        def fn(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            t = args[0].detach().float().reshape(-1).cpu()
            s = stats[name]
            s["min"] = min(s["min"], float(t.min()))
            s["max"] = max(s["max"], float(t.max()))
            k = min(t.numel(), _SAMPLE // 4)
            s["sample"].append(t[torch.randint(t.numel(), (k,), generator=g)])
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out = {}
    for n, s in stats.items():
        if not s["sample"]:
            continue  # the layer never ran on this input
        sample = torch.cat(s["sample"])[:_SAMPLE]
        q = torch.quantile(sample, torch.tensor([1e-4, 1 - 1e-4]))
        out[n] = {"min": s["min"], "max": s["max"], "p_lo": float(q[0]), "p_hi": float(q[1])}
    return out


@METHODS.register
class ActQuant(Method):
    name = "act_quant"
    axis = "activation"
    stage = 40
    calibrates = True  # ranges are measured on the model as the executor leaves it, recalibrated
    default_settings = ({"calib": "minmax", "bits": 8}, {"calib": "percentile", "bits": 8})
    setting_key = "calib"
    description = "per-tensor affine integer quantization of each layer's input (calibrated)"
    speed_note = ("needs an integer runtime (e.g. ONNX Runtime QDQ) to run faster; simulated in "
                  "PyTorch")

    def check_setting(self, setting: Mapping[str, Any]) -> Setting:
        calib = setting.get("calib", "minmax")
        bits = int(setting.get("bits", 8))
        if calib not in _CALIBS:
            raise ValueError(f"The 'calib' setting of act_quant must be one of {_CALIBS}. Got "
                             f"{calib!r} instead.")
        if not 2 <= bits <= 8:
            raise ValueError(f"The 'bits' setting of act_quant must be in 2..8. Got {bits} instead.")
        return {"calib": calib, "bits": bits}

    def label(self, setting: Mapping[str, Any]) -> str:
        return f"act{setting['bits']} {setting['calib']}"

    def level(self, setting: Mapping[str, Any]) -> float:
        return 32.0 - float(setting["bits"]) + (0.5 if setting["calib"] == "percentile" else 0.0)

    def effect(self, setting: Mapping[str, Any], unit: UnitInfo) -> dict[str, Any]:
        return {"act_bits": int(setting["bits"])}

    def units(self, ctx: MethodContext, settings: Sequence[Setting]) -> dict[str, str]:
        ranges = self._ranges(ctx)
        return {n: "" if n in ranges else "the layer did not run on the calibration data."
                for n in ctx.layers}

    def _ranges(self, ctx: MethodContext) -> dict[str, dict[str, float]]:
        if "act_ranges" not in ctx.cache:
            ctx.cache["act_ranges"] = activation_ranges(ctx.model, list(ctx.layers),
                                                        ctx.calibration_inputs())
        ranges: dict[str, dict[str, float]] = ctx.cache["act_ranges"]
        return ranges

    def _qparams(self, ctx: MethodContext, layer: str, setting: Mapping[str, Any]) -> dict[str, Any]:
        r = self._ranges(ctx)[layer]
        lo, hi = (r["min"], r["max"]) if setting["calib"] == "minmax" else (r["p_lo"], r["p_hi"])
        return act_qparams(lo, hi, int(setting["bits"]))

    @contextmanager
    def probe(self, ctx: MethodContext, unit: str, setting: Setting) -> Iterator[None]:
        handle = install_input_quant(ctx.module(unit), self._qparams(ctx, unit, setting))
        try:
            yield
        finally:
            handle.remove()

    def apply_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        ctx.cache.pop("act_ranges", None)  # measure on the model as it is now
        ranges_for = {layer: self._qparams(ctx, layer, s) for layer, s in assignment.items()}
        for layer, qp in ranges_for.items():
            install_input_quant(ctx.module(layer), qp)
        ctx.records.setdefault(self.name, {}).update(ranges_for)

    def rebuild_(self, ctx: MethodContext, record: Any) -> None:
        for layer, qp in record.items():
            install_input_quant(ctx.module(layer), qp)
