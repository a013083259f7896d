"""Compression methods: the one home of every way sensplan compresses a unit.

A method declares in one class everything the pipeline needs (see :class:`Method`):

- which units it applies to (``unit_kind`` "layer" for Conv/Linear weights, "group" for coupled
  channel groups) and which of them are safe (:meth:`Method.units`);
- its settings (``default_settings``, :meth:`Method.parse_settings`, :meth:`Method.label`);
- a reversible probe the scanner uses (:meth:`Method.probe`: perturb, yield, restore);
- the real transformation the executor applies (:meth:`Method.apply_`, :meth:`Method.finalize_`);
- how a setting changes size, MACs, BOPs and parameters, as plain data (:meth:`Method.effect`, in
  the vocabulary of :mod:`sensplan._effects`), so the planner never imports the method.

Methods on different ``axis`` values combine on one unit (a layer can be pruned by its group, get
4-bit weights, be 50% sparse and get 8-bit inputs); methods sharing an axis are alternatives (int4
weights or float16 weights). The executor applies them in ``stage`` order. The scanner, planner,
executor and report never branch on a method's name. Register a new method with
``METHODS.register`` (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sensplan._errors import UserInputError
from sensplan._registry import Registry
from sensplan.sensitivity._data import EvalSet

Setting = dict[str, Any]


@dataclass
class MethodContext:
    """What a method sees of the model being scanned or compressed.

    ``layers``/``groups``/``tensors`` are the scan table's structure sections (methods may annotate
    ``tensors``, e.g. pruning records which dims shrink with which group). ``cache`` holds per-run
    data a method computes once (e.g. activation ranges). ``records`` collects what the executor
    must store in the compressed model (e.g. activation quantization parameters).
    """

    model: nn.Module
    example_input: torch.Tensor
    layers: dict[str, dict[str, Any]]
    groups: dict[str, dict[str, Any]]
    tensors: dict[str, dict[str, Any]]
    calib: EvalSet | None = None
    eval_data: EvalSet | None = None
    check_inputs: torch.Tensor | None = None
    graph: Any = None
    graph_error: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: dict[str, Any] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def calibration_inputs(self, n: int = 512) -> torch.Tensor:
        """Inputs for calibrating a method: the calibration set, else the evaluation data."""
        src = self.calib if self.calib is not None else self.eval_data
        if src is None:
            return self.example_input
        return src.x[:n]

    def weight(self, layer: str) -> torch.Tensor:
        """The weight tensor of ``layer`` (its state-dict key is ``layers[layer]["weight"]``)."""
        return self.model.get_parameter(self.layers[layer]["weight"])


def ratio_setting(method: str, value: Any) -> float:
    """A fraction setting in (0, 1), with a message naming the method and the expected form."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = float("nan")
    if not 0.0 < r < 1.0:
        raise ValueError(f"The ratio setting of {method} must be a fraction in (0, 1), e.g. "
                         f"{method}=0.5. Got {value!r} instead.")
    return r


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class Method:
    """Base class of compression methods; subclasses set the class attributes and the hooks."""

    name: ClassVar[str] = ""
    unit_kind: ClassVar[str] = "layer"
    axis: ClassVar[str] = ""
    stage: ClassVar[int] = 50
    #: True when the method changes tensor shapes (done before fine-tuning, like pruning)
    structural: ClassVar[bool] = False
    #: on by default in ``sensplan scan`` (the others are opt-in with --methods)
    default_on: ClassVar[bool] = False
    default_settings: ClassVar[tuple[Setting, ...]] = ()
    setting_key: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: what the report says about speed (e.g. that dense kernels do not get faster)
    speed_note: ClassVar[str] = ""

    # -- settings ----------------------------------------------------------------------------------
    def check_setting(self, setting: Mapping[str, Any]) -> Setting:
        """Validate one setting; return it normalised. Raises ValueError naming the bad value."""
        return dict(setting)

    def parse_settings(self, text: str) -> list[Setting]:
        """Settings from the CLI's comma-separated list (values of ``setting_key``)."""
        out = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            try:
                value: Any = float(part) if "." in part or "e" in part.lower() else int(part)
            except ValueError:
                value = part
            out.append(self.check_setting({self.setting_key: value}))
        return out

    def label(self, setting: Mapping[str, Any]) -> str:
        return " ".join(f"{k}={_fmt(v)}" for k, v in setting.items())

    def level(self, setting: Mapping[str, Any]) -> float:
        """Order of compression strength among this method's settings (higher = stronger)."""
        return 0.0

    def effect(self, setting: Mapping[str, Any]) -> dict[str, Any]:
        """How the setting changes costs, in the vocabulary of :mod:`sensplan._effects`."""
        return {}

    # -- units ---------------------------------------------------------------------------------------
    def units(self, ctx: MethodContext, settings: Sequence[Setting]) -> dict[str, str]:
        """Every unit of ``unit_kind`` mapped to "" (scannable) or the reason it is skipped."""
        return {name: "" for name in ctx.layers}

    def unit_settings(self, ctx: MethodContext, unit: str, settings: Sequence[Setting]) -> list[Setting]:
        """The settings that are distinct and meaningful for ``unit`` (e.g. non-empty prunes)."""
        return [dict(s) for s in settings]

    # -- probe and transformation ---------------------------------------------------------------------
    @contextmanager
    def probe(self, ctx: MethodContext, unit: str, setting: Setting) -> Iterator[None]:
        """Perturb ``unit`` reversibly; everything is restored bit-exactly on exit."""
        raise NotImplementedError
        yield  # pragma: no cover

    def apply_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        """Apply the method to every unit of ``assignment`` in place (before BatchNorm recalibration)."""
        raise NotImplementedError

    def finalize_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        """The step after recalibration (e.g. structural removal of zeroed channels); default none."""

    def describe(self) -> dict[str, Any]:
        return {"unit_kind": self.unit_kind, "axis": self.axis, "stage": self.stage,
                "structural": self.structural, "description": self.description,
                "speed_note": self.speed_note}


class WeightMethod(Method):
    """A method that replaces a layer's weight by ``transform(weight)``: probe and apply for free."""

    def transform(self, ctx: MethodContext, layer: str, w: torch.Tensor, setting: Mapping[str, Any]
                  ) -> torch.Tensor:
        raise NotImplementedError

    @contextmanager
    def probe(self, ctx: MethodContext, unit: str, setting: Setting) -> Iterator[None]:
        w = ctx.weight(unit)
        original = w.detach().clone()
        try:
            with torch.no_grad():
                w.copy_(self.transform(ctx, unit, original, setting))
            yield
        finally:
            with torch.no_grad():
                w.copy_(original)

    def apply_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        with torch.no_grad():
            for layer, setting in assignment.items():
                w = ctx.weight(layer)
                w.copy_(self.transform(ctx, layer, w.detach().clone(), setting))


METHODS: Registry[Method] = Registry("compression method", flag="--methods")


def load_builtin_methods() -> None:
    """Import the built-in methods (they register themselves)."""
    from sensplan.sensitivity.methods import (  # noqa: F401
        act_quant,
        half,
        nm_sparsity,
        prune,
        sparsity,
        weight_quant,
    )


def get_method(name: str) -> Method:
    load_builtin_methods()
    return METHODS.get(name)


def all_methods() -> list[Method]:
    """Every registered method, in stage order (the order the executor applies them)."""
    load_builtin_methods()
    return sorted(METHODS, key=lambda m: (m.stage, not m.default_on, m.name))


def parse_method_list(text: str) -> list[str]:
    """``--methods prune,weight_quant`` -> names, each checked against the registry."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserInputError("--methods needs at least one method name, e.g. --methods prune,weight_quant.")
    for n in names:
        get_method(n)
    return names


__all__ = ["METHODS", "Method", "MethodContext", "Setting", "WeightMethod", "all_methods",
           "get_method", "load_builtin_methods", "parse_method_list"]
