"""Compression methods: the one home of every way sensplan compresses a unit.

A method declares in one class everything the pipeline needs (see :class:`Method`):

- which units it applies to (``unit_kind`` "layer" for Conv/Linear weights, "group" for coupled
  channel groups) and which of them are safe (:meth:`Method.units`);
- its settings (``default_settings``, :meth:`Method.parse_settings`, :meth:`Method.label`);
- a reversible probe the scanner uses (:meth:`Method.probe`: perturb, yield, restore);
- the real transformation the executor applies (:meth:`Method.apply_`, :meth:`Method.finalize_`),
  what it records of it, and how a saved model replays it (:meth:`Method.rebuild_`);
- how a setting changes size, MACs, BOPs and parameters on a given unit, as plain data
  (:meth:`Method.effect`, in the vocabulary of :mod:`sensplan._effects`; a change of structure as
  expressions of the unit's pruned dims, :mod:`sensplan._expr`), so the planner never imports it;
- which other methods it can follow on the same unit (:meth:`Method.can_follow`,
  :meth:`Method.can_be_followed_by`).

Methods on different ``axis`` values combine on one unit (a layer can be pruned by its group, get
4-bit weights, be 50% sparse and get 8-bit inputs); methods sharing an axis are alternatives (int4
weights or float16 weights). The executor applies them in ``stage`` order. The scanner, planner,
executor and container never branch on a method's name. Every module of this package registers
its methods on import (no list to edit); other packages add theirs through the ``sensplan.methods``
entry point group (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sensplan._effects import UnitInfo
from sensplan._errors import UserInputError
from sensplan._registry import Registry
from sensplan.sensitivity._data import EvalSet
from sensplan.sensitivity._groups import QUANTIZABLE

Setting = dict[str, Any]


@dataclass
class MethodContext:
    """What a method sees of the model being scanned, compressed or rebuilt.

    ``layers``/``groups``/``tensors`` are the scan table's structure sections (methods may annotate
    ``tensors``, e.g. pruning records which dims shrink with which group). ``cache`` holds per-run
    data a method computes once (e.g. activation ranges). ``records`` maps a method's name to what
    it must replay when the compressed model is loaded (plain JSON data: :meth:`Method.rebuild_`
    receives it). ``removed`` maps a channel group to the root indices a group method has zeroed in
    this run, so that a later method's ``apply_`` sees the pruned shape; it is cleared once the
    channels are removed (after the structural methods' ``finalize_`` when fine-tuning).
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
    records: dict[str, Any] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def unit_info(self, unit: str, kind: str) -> UnitInfo:
        """The unit as :meth:`Method.effect` sees it (shape, MACs or channel count, as scanned)."""
        return (UnitInfo.of_group(unit, self.groups[unit]) if kind == "group"
                else UnitInfo.of_layer(unit, self.layers[unit]))

    def unit_weights(self, layer: str) -> list[tuple[str, torch.Tensor]]:
        """The weights a layer unit stores now, as (state-dict key, parameter): its one weight, or,
        once a structural method replaced the layer (e.g. by two thinner layers), the weight of
        every Conv/Linear inside the module that took its place."""
        key = self.layers[layer]["weight"]
        try:
            return [(key, self.model.get_parameter(key))]
        except AttributeError:
            pass
        mod = self.module(layer)
        return [(f"{layer}.{name}.weight" if name else f"{layer}.weight", m.weight)
                for name, m in mod.named_modules() if isinstance(m, QUANTIZABLE)]

    def removed_indices(self, layer: str) -> tuple[list[int], list[int]]:
        """The output-channel and input-channel indices of ``layer``'s weight that the group
        removals of this run (:attr:`removed`) take away, in the layer's own numbering."""
        out: set[int] = set()
        inp: set[int] = set()
        if self.graph is not None:
            for gid, idxs in self.removed.items():
                sides = self.graph.layer_indices(gid, idxs, layer)
                out.update(sides.get("out", ()))
                inp.update(sides.get("in", ()))
        return sorted(out), sorted(inp)

    def calibration_inputs(self, n: int = 512) -> torch.Tensor:
        """Inputs for calibrating a method: the calibration set, else the evaluation data."""
        src = self.calib if self.calib is not None else self.eval_data
        if src is None:
            return self.example_input
        return src.x[:n]

    def weight(self, layer: str) -> torch.Tensor:
        """The weight tensor of ``layer`` (its state-dict key is ``layers[layer]["weight"]``)."""
        return self.model.get_parameter(self.layers[layer]["weight"])


def ratio_setting(method: str, value: Any, key: str = "ratio") -> float:
    """A fraction setting in (0, 1), with a message naming the method, the key and the form."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = float("nan")
    if not 0.0 < r < 1.0:
        raise ValueError(f"The {key!r} setting of {method} must be a fraction in (0, 1), e.g. "
                         f"{method}=0.5. Got {value!r} instead.")
    return r


def setting_value(method: str, setting: Mapping[str, Any], key: str) -> Any:
    """``setting[key]``, or a ValueError naming the key the method needs."""
    if key not in setting:
        raise ValueError(f"A {method} setting needs {key!r}, e.g. {{{key!r}: ...}}. Got {dict(setting)!r}.")
    return setting[key]


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
    #: True when ``apply_`` calibrates on the model (e.g. activation ranges): the executor runs it
    #: after every other method's ``apply_``, on the model with its BatchNorm recalibrated, as it
    #: will run
    calibrates: ClassVar[bool] = False
    #: its probe changes only the values of existing parameters (no module swapped, no hook, no
    #: buffer): ``scan --fast`` may then estimate it from the Fisher information instead of measuring
    values_only: ClassVar[bool] = False
    default_settings: ClassVar[tuple[Setting, ...]] = ()
    #: the settings scanned by default on a transformer (``--model hf:...``); None: ``default_settings``
    transformer_settings: ClassVar[tuple[Setting, ...] | None] = None
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

    def family(self, setting: Mapping[str, Any]) -> str:
        """Settings of one family are nested: a stronger one is never better (the planner's
        envelope takes the worst of the milder ones). Settings of different families (e.g. weight
        formats with and without a zero point) are not compared. Default: one family."""
        return ""

    def effect(self, setting: Mapping[str, Any], unit: UnitInfo) -> dict[str, Any]:
        """How the setting changes the costs of ``unit``, in the vocabulary of
        :mod:`sensplan._effects`: value fields (bits, density), ``removed`` channels for a group, or
        a ``structure`` (:class:`sensplan._expr.Structure`) of the unit's pruned dims."""
        return {}

    # -- compatibility -------------------------------------------------------------------------------
    def can_follow(self, other: Method) -> bool:
        """Whether this method can be applied to a unit that ``other`` (earlier in :func:`execution_order`)
        already changed. The planner never offers, and the executor never applies, a pair either
        side refuses."""
        return True

    def can_be_followed_by(self, other: Method) -> bool:
        """Whether ``other`` (later in :func:`execution_order`) can be applied to a unit after this
        method changed it. A method that restructures a unit says here what can still follow."""
        return True

    # -- units ---------------------------------------------------------------------------------------
    def units(self, ctx: MethodContext, settings: Sequence[Setting]) -> dict[str, str]:
        """Every unit of ``unit_kind`` mapped to "" (scannable) or the reason it is skipped. For a
        group method: each channel group whose strongest setting (the most channels its
        :meth:`effect` removes) passes the safety check (:meth:`checked_groups`)."""
        if self.unit_kind != "group":
            return {name: "" for name in ctx.layers}
        removals: dict[str, int | str] = {}
        for gid in ctx.groups:
            removed = [int(self.effect(s, ctx.unit_info(gid, "group")).get("removed", 0))
                       for s in self.unit_settings(ctx, gid, settings)]
            removals[gid] = max(removed, default=0) or (f"no setting of {self.name} removes a channel of its "
                                                        f"{ctx.groups[gid]['channels']} while keeping one.")
        return self.checked_groups(ctx, removals)

    @staticmethod
    def checked_groups(ctx: MethodContext, removals: Mapping[str, int | str]) -> dict[str, str]:
        """The safety check of channel groups, for a group method's :meth:`units`: each group of
        ``removals`` maps to the channels its strongest setting removes, or to the reason it is
        skipped already. A group the graph finds unsafe, or whose zeroing probe does not give what
        removing the channels gives (:func:`~sensplan.sensitivity.check_group`, on ``ctx.check_inputs``),
        is skipped with the reason; for the others the check records in ``ctx.tensors`` which
        dims of which tensors shrink with the group (what the planner prices). Returns ``units``'s
        mapping."""
        from sensplan.sensitivity._groups import check_group

        if ctx.check_inputs is None:
            raise TypeError("MethodContext.check_inputs is needed to check channel groups")
        with torch.no_grad():
            reference = ctx.model(ctx.check_inputs)  # once: every check compares with it
        out: dict[str, str] = {}
        for gid, removal in removals.items():
            if ctx.graph.unsafe_reason(gid):
                out[gid] = ctx.graph.unsafe_reason(gid)
                continue
            if isinstance(removal, str):
                out[gid] = removal
                continue
            chk = check_group(ctx.model, ctx.graph, gid, removal, ctx.check_inputs, reference=reference)
            out[gid] = chk.reason
            if chk.ok:
                for key, dims in chk.shrinks.items():
                    ctx.tensors[key]["shrinks"][gid] = dims
        return out

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

    def rebuild_(self, ctx: MethodContext, record: Any) -> None:
        """Replay on a freshly built original model what ``apply_``/``finalize_`` recorded in
        ``ctx.records[self.name]`` (structure and hooks; the weights are loaded afterwards).
        ``load_compressed`` calls it in stage order, with a context that holds the model, a zero
        input of the recorded shape and the device (no scan sections, no data, no graph: the record
        must say all the method needs). Default: nothing (a method that only changes weight values
        needs no replay)."""

    def describe(self) -> dict[str, Any]:
        return {"unit_kind": self.unit_kind, "axis": self.axis, "stage": self.stage,
                "structural": self.structural, "description": self.description,
                "speed_note": self.speed_note, "setting_key": self.setting_key}


class WeightMethod(Method):
    """A method that replaces each weight of a layer by ``transform(weight)``: probe and apply for
    free. A restructured layer (e.g. factorized into two) has each of its weights transformed."""

    values_only = True

    def transform(self, ctx: MethodContext, layer: str, w: torch.Tensor, setting: Mapping[str, Any]
                  ) -> torch.Tensor:
        raise NotImplementedError

    @contextmanager
    def probe(self, ctx: MethodContext, unit: str, setting: Setting) -> Iterator[None]:
        weights = [w for _, w in ctx.unit_weights(unit)]
        originals = [w.detach().clone() for w in weights]
        try:
            with torch.no_grad():
                for w, original in zip(weights, originals, strict=True):
                    w.copy_(self.transform(ctx, unit, original, setting))
            yield
        finally:
            with torch.no_grad():
                for w, original in zip(weights, originals, strict=True):
                    w.copy_(original)

    def apply_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        with torch.no_grad():
            for layer, setting in assignment.items():
                for _, w in ctx.unit_weights(layer):
                    w.copy_(self.transform(ctx, layer, w.detach().clone(), setting))


METHODS: Registry[Method] = Registry("compression method", flag="--methods", entry_points="sensplan.methods")


def load_builtin_methods() -> None:
    """Import every module of this package (each registers its methods), then the methods other
    installed packages declare under the ``sensplan.methods`` entry point group. Runs once."""
    METHODS.discover(__name__, __path__, Method)


def get_method(name: str, *, named_in: str = "") -> Method:
    """The registered method ``name`` (``named_in``: the file that names it, for the message when
    it is not installed)."""
    load_builtin_methods()
    return METHODS.get(name, named_in=named_in)


def execution_order(method: Method) -> tuple[int, str]:
    """The executor applies methods by this key: ``stage``, then name (a stable order)."""
    return method.stage, method.name


def compatible(a: Method, b: Method) -> bool:
    """Whether ``a`` and ``b`` can both change one unit (in execution order, whichever comes first)."""
    first, second = sorted((a, b), key=execution_order)
    return second.can_follow(first) and first.can_be_followed_by(second)


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


__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "Setting",
    "UnitInfo",
    "WeightMethod",
    "all_methods",
    "compatible",
    "execution_order",
    "get_method",
    "load_builtin_methods",
    "parse_method_list",
]
