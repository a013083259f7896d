"""Low-rank factorization: a layer replaced by two thinner layers through a truncated SVD.

A Linear (out x in) becomes a Linear to ``r`` features (no bias) followed by a Linear to ``out``
(with the original bias). A Conv2d (out x in x kh x kw) becomes a kh x kw convolution to ``r``
channels (with the original stride, padding and dilation) followed by a 1 x 1 convolution to
``out`` channels. With the weight as a matrix W (out x in*kh*kw) = U S V^T, the two weights are
A = sqrt(S_r) V_r^T and B = U_r sqrt(S_r): the best rank-r approximation B A of W.

Setting: ``rank``, the fraction of the full rank min(out, in*kh*kw) kept; r = max(1, round half up
(rank x full rank)). Where pruning shrinks the layer too, the rank is taken on the pruned shape
(the scan records it as an expression of the pruned dims, so the planner prices both together
exactly). A setting is offered on a layer only where the factorized form stores fewer values than
the layer.

Grouped convolutions, other layer types, and layers whose forward never runs (attention's packed
projections, a weight the model uses directly) are skipped with the reason. Integer or 16-bit
weights can follow on the same layer (each factor is quantized); sparsity and input quantization
cannot.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from sensplan._expr import Stored, Structure, maximum, minimum, round_half_up
from sensplan.sensitivity._models import swap_module
from sensplan.sensitivity.methods import (
    METHODS,
    Method,
    MethodContext,
    Setting,
    UnitInfo,
    WeightMethod,
    ratio_setting,
    setting_value,
)


def rank_for(fraction: float, rows: int, cols: int) -> int:
    """The rank kept of a rows x cols matrix: what the scan's expression computes (same float ops)."""
    return max(1, math.floor(fraction * min(rows, cols) + 0.5))


def factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-``rank`` approximation of ``w`` viewed as (out, rest);
    A is (rank, rest), B is (out, rank). Computed in float64, returned in ``w``'s dtype."""
    mat = w.detach().reshape(w.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(w.dtype), (u[:, :rank] * root[None, :]).to(w.dtype)


def _weight(m: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, m.weight)


def _bias(m: nn.Module) -> torch.Tensor | None:
    b = getattr(m, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def _pair(like: nn.Module, n_in: int, rank: int, n_out: int, bias: bool) -> nn.Sequential:
    """The two layers that replace a layer like ``like`` (its kind; a convolution's kernel, stride,
    padding and dilation) from ``n_in`` to ``rank`` to ``n_out`` channels, uninitialised."""
    kw: dict[str, Any] = {"device": _weight(like).device, "dtype": _weight(like).dtype}
    if isinstance(like, nn.Linear):
        return nn.Sequential(nn.Linear(n_in, rank, bias=False, **kw), nn.Linear(rank, n_out, bias=bias, **kw))
    assert isinstance(like, nn.Conv2d)  # noqa: S101 - units() admits Linear and Conv2d only
    return nn.Sequential(
        nn.Conv2d(n_in, rank, cast(tuple[int, int], like.kernel_size), stride=cast(tuple[int, int], like.stride),
                  padding=like.padding, dilation=cast(tuple[int, int], like.dilation), bias=False,  # type: ignore[arg-type]
                  padding_mode=like.padding_mode, **kw),
        nn.Conv2d(rank, n_out, 1, bias=bias, **kw))


def _fill_(pair: nn.Sequential, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> nn.Sequential:
    first, second = _weight(pair[0]), _weight(pair[1])
    with torch.no_grad():
        first.copy_(a.reshape(first.shape))
        second.copy_(b.reshape(second.shape))
        out_bias = _bias(pair[1])
        if bias is not None and out_bias is not None:
            out_bias.copy_(bias)
    return pair


def _keep(n: int, removed: Sequence[int]) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long)


@METHODS.register
class LowRank(Method):
    name = "lowrank"
    axis = "rank"
    stage = 10  # after group pruning has zeroed its channels (it factorizes the kept ones)
    structural = True
    default_settings = tuple({"rank": r} for r in (0.75, 0.5, 0.25))
    setting_key = "rank"
    description = "low-rank factorization: a layer replaced by two thinner layers (truncated SVD)"
    speed_note = ("fewer MACs and a smaller file on every runtime when the rank is low enough; two "
                  "layers instead of one")

    # -- settings ----------------------------------------------------------------------------------
    def check_setting(self, setting: Mapping[str, Any]) -> Setting:
        return {"rank": ratio_setting("lowrank", setting_value("lowrank", setting, "rank"), "rank")}

    def label(self, setting: Mapping[str, Any]) -> str:
        return f"rank {float(setting['rank']):.0%}"

    def level(self, setting: Mapping[str, Any]) -> float:
        return 1.0 - float(setting["rank"])  # a lower rank is stronger

    def effect(self, setting: Mapping[str, Any], unit: UnitInfo) -> dict[str, Any]:
        out, inp = unit.dims[0], unit.dims[1]
        k = math.prod(unit.shape[2:])  # kernel positions: pruning never changes them
        rank = maximum(1, round_half_up(float(setting["rank"]) * minimum(out, inp * k)))
        per = unit.macs_per_weight  # both layers run at the original's output positions
        return {"structure": Structure((Stored(rank, inp * k), Stored(out, rank)),
                                       macs=per * (rank * inp * k + out * rank))}

    # -- units -------------------------------------------------------------------------------------
    def units(self, ctx: MethodContext, settings: Sequence[Setting]) -> dict[str, str]:
        ran = self._forward_ran(ctx)
        out = {}
        for name in ctx.layers:
            mod = ctx.module(name)
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                out[name] = f"low-rank factorization covers Linear and Conv2d layers, not {type(mod).__name__}."
            elif isinstance(mod, nn.Conv2d) and mod.groups > 1:
                out[name] = (f"a grouped convolution (groups={mod.groups}) is {mod.groups} separate blocks; it "
                             f"is not factorized.")
            elif name not in ran:
                out[name] = ("its forward never runs on the data (the model uses its weight directly, e.g. a "
                             "packed attention projection): replacing the module would not change the model.")
            elif type(mod) not in (nn.Linear, nn.Conv2d):
                out[name] = (f"{type(mod).__name__} subclasses {type(mod).__mro__[1].__name__} and may compute or "
                             f"hold more than its weight (a gain, a standardization); the two plain layers that "
                             f"would replace it would drop that. Not factorized.")
            elif not self.unit_settings(ctx, name, settings):
                shape = ctx.layers[name]["weight_shape"]
                out[name] = (f"no scanned rank stores fewer values than the layer ({shape[0]} x "
                             f"{math.prod(shape[1:])}).")
            else:
                out[name] = ""
        return out

    def unit_settings(self, ctx: MethodContext, unit: str, settings: Sequence[Setting]) -> list[Setting]:
        shape = ctx.layers[unit]["weight_shape"]
        rows, cols = int(shape[0]), math.prod(shape[1:])
        kept: dict[int, Setting] = {}
        for s in sorted(settings, key=lambda s: -float(s["rank"])):
            r = rank_for(float(s["rank"]), rows, cols)
            if r * (rows + cols) < rows * cols and r not in kept:
                kept[r] = dict(s)
        return list(kept.values())

    @staticmethod
    def _forward_ran(ctx: MethodContext) -> set[str]:
        if "lowrank_ran" not in ctx.cache:
            ran: set[str] = set()
            hooks = [ctx.module(n).register_forward_hook(lambda *_, n=n: ran.add(n)) for n in ctx.layers]
            try:
                with torch.no_grad():
                    ctx.model(ctx.example_input)
            finally:
                for h in hooks:
                    h.remove()
            ctx.cache["lowrank_ran"] = ran
        return ctx.cache["lowrank_ran"]  # type: ignore[no-any-return]

    # -- probe and transformation --------------------------------------------------------------------
    @contextmanager
    def probe(self, ctx: MethodContext, unit: str, setting: Setting) -> Iterator[None]:
        original = ctx.module(unit)
        swap_module(ctx.model, unit, self._build(ctx, unit, setting))
        try:
            yield
        finally:
            swap_module(ctx.model, unit, original)

    def _build(self, ctx: MethodContext, unit: str, setting: Mapping[str, Any]) -> nn.Sequential:
        """The factorized replacement of ``unit`` in the numbering of the layer as it is now (the
        channels group methods removed this run are zero in it and stay zero)."""
        mod = ctx.module(unit)
        w = _weight(mod).detach()
        out_rm, in_rm = ctx.removed_indices(unit)
        keep_out, keep_in = _keep(w.shape[0], out_rm).to(w.device), _keep(w.shape[1], in_rm).to(w.device)
        live = w.index_select(0, keep_out).index_select(1, keep_in)
        rank = rank_for(float(setting["rank"]), live.shape[0], math.prod(live.shape[1:]))
        a_live, b_live = factors(live, rank)
        a = torch.zeros(rank, *w.shape[1:], dtype=w.dtype, device=w.device)
        a.index_copy_(1, keep_in, a_live.reshape(rank, *live.shape[1:]))
        b = torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device)
        b.index_copy_(0, keep_out, b_live)
        ctx.cache.setdefault("lowrank_kept", {})[unit] = (keep_out.cpu(), keep_in.cpu())
        b0 = _bias(mod)
        bias = b0.detach() if b0 is not None else None
        return _fill_(_pair(mod, w.shape[1], rank, w.shape[0], bias is not None), a, b, bias).train(mod.training)

    def apply_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        record = ctx.records.setdefault(self.name, {})
        for layer, setting in assignment.items():
            new = self._build(ctx, layer, setting)
            swap_module(ctx.model, layer, new)
            record[layer] = {"rank": int(_weight(new[0]).shape[0])}

    def finalize_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        # group methods removed their channels from the layers they know; the factors of a layer
        # this method replaced still hold them (as zeros): take them out the same way
        for layer in assignment:
            keep_out, keep_in = ctx.cache["lowrank_kept"][layer]
            seq = ctx.module(layer)
            first, second = seq[0], seq[1]  # type: ignore[index]
            a, b, b0 = _weight(first).detach(), _weight(second).detach(), _bias(second)
            if len(keep_out) == b.shape[0] and len(keep_in) == a.shape[1]:
                continue
            dev = a.device
            bias = b0.detach().index_select(0, keep_out.to(dev)) if b0 is not None else None
            new = _pair(first, len(keep_in), a.shape[0], len(keep_out), bias is not None)
            swap_module(ctx.model, layer, _fill_(new, a.index_select(1, keep_in.to(dev)),
                                           b.index_select(0, keep_out.to(dev)), bias))

    def rebuild_(self, ctx: MethodContext, record: Any) -> None:
        # the layer is as group methods left it (their records were replayed first): same shapes
        for layer, rec in record.items():
            mod = ctx.module(layer)
            w = _weight(mod)
            swap_module(ctx.model, layer, _pair(mod, w.shape[1], int(rec["rank"]), w.shape[0], _bias(mod) is not None))

    # -- compatibility ------------------------------------------------------------------------------
    def can_be_followed_by(self, other: Method) -> bool:
        # weight formats apply to each factor; sparsity patterns and input quantization do not
        return isinstance(other, WeightMethod) and other.axis == "weight"

