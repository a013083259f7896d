"""The Torch-Pruning adapter: channel groups, the channel-selection criterion, the reversible
zeroing probe, real structural pruning, and the safety check that ties the two together.

All Torch-Pruning calls live here. A *group* is a set of coupled channels (Torch-Pruning's
DependencyGraph): e.g. every conv and BatchNorm that writes into one residual stream. A group is
named by its *root*: the FQN of the first Conv/Linear whose output channels define it.

Channel selection (:meth:`PruningGraph.select`) is the one criterion used by both the scanner's
probe and the executor: the group L2 magnitude (Torch-Pruning's ``GroupMagnitudeImportance``,
p=2, mean over the group's members); the ``n_remove`` channels with the smallest score go.

**Grouped convolutions and GroupNorm.** A conv with ``groups=g`` splits its channels into g
interleaved chunks that must stay equal in size, and Torch-Pruning prunes its inputs by position
within the first chunk. So a group holding such a member removes channels as its pruner does for
"channel groups": the same positions from every chunk (importance averaged over the chunks), a
multiple of the group's ``channel_step`` (the lcm of its members' ``groups`` / ``num_groups``).

**What the probe emulates.** Zeroing a conv's output channel, its BatchNorm's scale and offset and
every consumer's input weights makes the channel contribute nothing, as its removal would. A
LayerNorm or GroupNorm over the channels still counts a zeroed channel in its mean and variance, so
while channels of such a norm are zeroed, a forward hook recomputes the norm over the kept channels
only: what the pruned norm computes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from sensplan._effects import n_remove_for
from sensplan._errors import first_line

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
QUANTIZABLE = (*_CONV, *_CONVT, nn.Linear)

CRITERION = "group_l2_magnitude"

__all__ = ["CRITERION", "QUANTIZABLE", "PruningGraph", "check_group", "count_macs", "layer_weight_key", "n_remove_for"]

# Operations Torch-Pruning passes channels through unchanged (element-wise, per channel, or over
# the spatial dims only). Any other operation in a group is named in a skip reason.
_PLAIN_OPS = ("add", "sub", "mul", "div", "neg", "relu", "gelu", "silu", "sigmoid", "hardswish",
              "hardsigmoid", "hardtanh", "tanh", "clamp", "elu", "leakyrelu", "mish", "softplus",
              "maxpool", "avgpool", "adaptiveavgpool", "adaptivemaxpool", "mean", "dropout", "clone",
              "toCopy", "upsample", "mulscalar", "addcmul", "pow", "sqrt", "rsqrt", "exp", "abs",
              "maximum", "minimum", "where", "alias", "detach", "contiguous", "nativebatchnorm",
              "cudnnbatchnorm", "sum", "scalar")


@dataclass(frozen=True)
class Member:
    """One coupled piece of a group: module FQN and whether its output or input channels move."""

    module: str
    side: str  # "out" or "in"
    kind: str  # module class name


class ZeroingProbe:
    """The reversible probe of a channel graph, from its ``zero_`` and ``unzero_``."""

    def zero_(self, gid: str, idxs: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def unzero_(self, gid: str, idxs: list[int], saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        raise NotImplementedError

    @contextmanager
    def zeroed(self, gid: str, idxs: list[int]) -> Iterator[None]:
        """Zero channels ``idxs`` of group ``gid`` (:meth:`zero_`), restoring them bit-exactly after."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            saved = self.zero_(gid, idxs)
            yield
        finally:
            self.unzero_(gid, idxs, saved)


def shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Every parameter that more than one (module, name) holds: tied weights, with their places."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, k))
    return [v for v in owners.values() if len(v) > 1]


def retie_(shared: list[list[tuple[nn.Module, str]]]) -> None:
    """After a removal, make the places of each formerly tied parameter (see
    :func:`shared_parameters`) hold one parameter again, where they were pruned alike (same shape
    and values); places pruned differently stay apart."""
    for places in shared:
        first_m, first_k = places[0]
        p = first_m._parameters[first_k]
        for m, k in places[1:]:
            q = m._parameters[k]
            if q is not None and p is not None and q is not p and q.shape == p.shape and torch.equal(q, p):
                m._parameters[k] = p


class PruningGraph(ZeroingProbe):
    """Torch-Pruning's DependencyGraph of ``model`` traced with ``example_input``, keyed by FQN.

    Building it runs one forward pass with autograd enabled (Torch-Pruning traces the graph); the
    model's parameters and buffers are not changed (the model is put in eval mode first).
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, dg: Any = None) -> None:
        import torch_pruning as tp  # lazily: it imports timm (seconds) where installed
        model.eval()
        self.model = model
        self.example_input = example_input
        # the most channel indices one mapping may produce (see _IndexGuard); a flatten into a
        # classifier produces at most the largest weight dim, a runaway reshape chain far more
        self._index_limit = 8 * max([1 << 14, *(max(p.shape, default=1) for p in model.parameters())])
        if dg is None:
            with torch.enable_grad(), _IndexGuard(self._index_limit):
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                           verbose=False)
        self.dg = dg
        # a group's dependencies: about a quarter of the graph's nodes at most in the torchvision
        # zoo (densenet121: 102 of 432); a walk past four times the nodes does not close
        self._dep_limit = 4 * len(dg.module2node) + 64
        self._name = {m: n for n, m in model.named_modules()}
        self._module = dict(model.named_modules())
        self._roots: dict[str, nn.Module] = {}
        self._channels: dict[str, int] = {}
        self._steps: dict[str, tuple[int, str]] = {}
        self._members: dict[str, tuple[Member, ...]] = {}
        self._unsafe: dict[str, str] = {}  # groups Torch-Pruning cannot even map: gid -> reason
        for root, group, error in self._all_groups():
            gid = self._name[root]
            self._roots[gid] = root
            if group is None:
                pruner = self.dg.get_pruner_of_module(root)
                self._channels[gid] = int(pruner.get_out_channels(root))
                self._members[gid] = (Member(gid, "out", type(root).__name__),)
                self._steps[gid] = (1, "")
                self._unsafe[gid] = error
                continue
            self._channels[gid] = len(group[0].idxs)
            self._members[gid] = tuple(self._members_of(group))
            self._steps[gid] = self._step_of(group, self._channels[gid])
        # norms whose channels are being zeroed: module -> {channel: how many zeroings hold it}
        self._norm_masks: dict[nn.Module, dict[int, int]] = {}
        self._norm_hooks: dict[nn.Module, Any] = {}

    def copy(self) -> PruningGraph:
        """A deep copy of the model with its graph, without tracing again: one ``deepcopy`` of the
        pair keeps the graph's references pointing at the copied modules."""
        import torch_pruning as tp  # lazily: it imports timm (seconds) where installed
        # Torch-Pruning's graph refers to its ops module and to autograd nodes: share, don't copy
        memo: dict[int, Any] = {id(self.dg.ops): self.dg.ops}
        # ... and its pruning functions: Torch-Pruning compares a dependency's handler with its
        # module-level functions (e.g. ``prune_depthwise_conv_out_channels``); a copied handler
        # is bound to a copied pruner and never equal, so a depthwise conv's group would lose
        # every member but the conv itself
        pruners = [*self.dg.REGISTERED_PRUNERS.values(), *self.dg.CUSTOMIZED_PRUNERS.values(),
                   *getattr(tp.pruner.function, "PrunerBox", {}).values()]
        for fn in (*getattr(self.dg, "_in_channel_pruning_fn", ()),
                   *getattr(self.dg, "_out_channel_pruning_fn", ())):
            pruners.append(getattr(fn, "__self__", None))
        memo.update({id(p): p for p in pruners if p is not None})
        for node in self.dg.module2node.values():
            for value in vars(node).values():
                if hasattr(value, "next_functions"):  # an autograd node (grad_fn)
                    memo[id(value)] = value
        model, dg = copy.deepcopy((self.model, self.dg), memo)
        return PruningGraph(model.eval(), self.example_input, dg)

    # -- discovery -----------------------------------------------------------------------------
    def _all_groups(self) -> Iterator[tuple[nn.Module, Any, str]]:
        """Torch-Pruning's ``get_all_groups`` (each Conv/Linear not yet in a group roots one), but a
        root whose index mapping runs away yields ``(root, None, reason)`` instead of stopping the
        whole graph: the other groups stay prunable."""
        visited: set[int] = set()
        for m in list(self.dg.module2node):
            if not isinstance(m, QUANTIZABLE) or id(m) in visited or m not in self._name:
                continue
            pruner = self.dg.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                with _IndexGuard(self._index_limit, self._dep_limit):
                    group = self.dg.get_pruning_group(m, pruner.prune_out_channels,
                                                      list(range(pruner.get_out_channels(m))))
            except _IndexExplosion as e:
                visited.add(id(m))
                yield m, None, (f"Torch-Pruning cannot map this group's channels: {e}. The group is not "
                                "scanned or pruned.")
                continue
            for dep, _ in group:
                if self.dg.is_out_channel_pruning_fn(dep.handler):
                    visited.add(id(dep.target.module))
            unmapped: set[Any] = getattr(self.dg, "_sensplan_unmapped", set())
            through = [n for dep, _ in group for n in (dep.source, dep.target) if n in unmapped]
            if through:
                yield m, None, (f"Torch-Pruning cannot map this group's channels: they pass through a "
                                f"concatenation ({through[0].name}) whose input channel counts it cannot "
                                "infer (its shape inference stops at a depth limit). The group is not "
                                "scanned or pruned.")
                continue
            yield m, group, ""

    def group_ids(self) -> list[str]:
        return list(self._roots)

    def unsafe_reason(self, gid: str) -> str:
        """Why group ``gid`` cannot be pruned at all ("" when it can be checked)."""
        return self._unsafe.get(gid, "")

    def channels(self, gid: str) -> int:
        return self._channels[gid]

    def channel_step(self, gid: str) -> int:
        """Channels of ``gid`` are removed in multiples of this (1 unless a member is a grouped
        convolution or a GroupNorm: then the same positions go from each of its chunks)."""
        return self._steps[gid][0]

    def step_cause(self, gid: str) -> str:
        """The member that sets :meth:`channel_step` (e.g. ``"grouped convolution 'b' (groups=4)"``)."""
        return self._steps[gid][1]

    def n_remove_for(self, gid: str, ratio: float) -> int:
        """Channels removed from ``gid`` at ``ratio``: per chunk, round half up, one kept per chunk."""
        return n_remove_for(ratio, self._channels[gid], self.channel_step(gid))

    def members(self, gid: str) -> tuple[Member, ...]:
        return self._members[gid]

    def _members_of(self, group: Any) -> Iterator[Member]:
        seen = set()
        for dep, _ in group:
            mod = dep.target.module
            if not isinstance(mod, nn.Module) or mod not in self._name:
                continue  # concat/split/elementwise placeholders and bare parameters
            side = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
            key = (self._name[mod], side)
            if key not in seen:
                seen.add(key)
                yield Member(self._name[mod], side, type(mod).__name__)

    def _step_of(self, group: Any, channels: int) -> tuple[int, str]:
        # as Torch-Pruning's pruner detects "channel groups": grouped (not depthwise) convs and
        # GroupNorm; the lcm keeps every member's chunks equal, not only the largest one's
        step, causes = 1, []
        for dep, _ in group:
            mod = dep.target.module
            if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.groups != mod.out_channels:
                n, what = mod.groups, f"grouped convolution {self._name.get(mod, '?')!r} (groups={mod.groups})"
            elif isinstance(mod, nn.GroupNorm) and mod.num_groups > 1:
                n, what = mod.num_groups, f"GroupNorm {self._name.get(mod, '?')!r} ({mod.num_groups} groups)"
            else:
                continue
            if step % n:
                step = math.lcm(step, n)
                causes.append(what)
        if step > 1 and channels % step:
            return 1, ""  # the chunks do not line up with the root's channels: the check decides
        return step, ", ".join(causes[:2]) + (" and more" if len(causes) > 2 else "")

    def _group(self, gid: str, idxs: list[int]) -> Any:
        if gid in self._unsafe:
            raise ValueError(f"Group {gid!r} cannot be pruned: {self._unsafe[gid]}")
        root = self._roots[gid]
        pruner = self.dg.get_pruner_of_module(root)
        with _IndexGuard(self._index_limit, self._dep_limit):
            return self.dg.get_pruning_group(root, pruner.prune_out_channels, idxs)

    def layer_indices(self, gid: str, idxs: list[int], module: str) -> dict[str, list[int]]:
        """The indices of ``module``'s weight that removing channels ``idxs`` of ``gid`` removes:
        ``{"out": [...], "in": [...]}`` in the module's own numbering (a side is absent when the
        module is not a member on it)."""
        target = self._module.get(module)
        found: dict[str, set[int]] = {}
        if target is None or not idxs:
            return {}
        for dep, midx in self._group(gid, idxs):
            if dep.target.module is target:
                side = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
                found.setdefault(side, set()).update(int(i) for i in midx)
        return {side: sorted(v) for side, v in found.items()}

    # -- the criterion ---------------------------------------------------------------------------
    @torch.no_grad()
    def importance(self, gid: str) -> torch.Tensor:
        """Group L2 magnitude of each of the group's channels (higher = more important); with a
        :meth:`channel_step` above 1, each position's mean over the chunks, repeated per chunk."""
        import torch_pruning as tp  # lazily: it imports timm (seconds) where installed
        channels, step = self._channels[gid], self.channel_step(gid)
        group = self._group(gid, list(range(channels)))
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)(group)
        if imp is None:  # a group with no weights of its own: nothing to rank by, keep order
            return torch.arange(channels, 0, -1, dtype=torch.float32)
        scores = torch.as_tensor(imp).detach().float().cpu()
        if step > 1:
            scores = scores.view(step, -1).mean(dim=0).repeat(step)
        return scores

    def select(self, gid: str, n_remove: int) -> list[int]:
        """The ``n_remove`` least important channels of group ``gid`` (sorted root indices).

        With a :meth:`channel_step` above 1 the same positions go from every chunk, so
        ``n_remove`` must be a multiple of the step (``ValueError`` otherwise)."""
        if n_remove <= 0:
            return []
        channels, step = self._channels[gid], self.channel_step(gid)
        if n_remove % step:
            raise ValueError(f"Group {gid!r} removes channels in multiples of {step} (its "
                             f"{self.step_cause(gid)} needs equal chunks). Got n_remove={n_remove}.")
        chunk = channels // step
        order = torch.argsort(self.importance(gid)[:chunk], stable=True)[: n_remove // step]
        return sorted(int(p) + c * chunk for c in range(step) for p in order)

    # -- the reversible probe (``zeroed``, from ZeroingProbe) -------------------------------------
    @torch.no_grad()
    def zero_(self, gid: str, idxs: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zero channels ``idxs`` of group ``gid`` in place, and emulate their removal in the norms
        over the channels; return (tensor, previous value) pairs for :meth:`unzero_`. The executor
        calls :meth:`unzero_` with ``saved=[]`` before pruning for real.

        Zeroing a conv's output channel, its BatchNorm's scale *and* offset, and every consumer's
        input weights makes the channel contribute exactly nothing, as its removal would. Norms over
        the channels (LayerNorm, GroupNorm) are recomputed over the kept channels meanwhile.
        """
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not idxs:
            return saved
        for dep, midx in self._group(gid, idxs):
            mod = dep.target.module
            index = torch.as_tensor(midx, dtype=torch.long)
            if isinstance(mod, nn.Parameter):  # a bare parameter (a scale, a token, an embedding)
                dim = dep.target.pruning_dim
                saved.append((mod, mod.detach().clone()))
                mod.index_fill_(dim, index.to(mod.device), 0.0)
                continue
            if not isinstance(mod, nn.Module):
                continue
            out = self.dg.is_out_channel_pruning_fn(dep.handler)
            for param, zero in _zero_targets(mod, out):
                saved.append((param, param.detach().clone()))
                zero(param, index.to(param.device))
            if _norm_channel_dim(mod) is not None:
                mask = self._norm_masks.setdefault(mod, {})
                for i in midx:
                    mask[int(i)] = mask.get(int(i), 0) + 1
                if mod not in self._norm_hooks:
                    self._norm_hooks[mod] = mod.register_forward_hook(self._masked_norm)
        return saved

    @torch.no_grad()
    def unzero_(self, gid: str, idxs: list[int], saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Undo :meth:`zero_`: restore the ``saved`` tensors and stop emulating the removal in norms."""
        for param, value in reversed(saved):
            param.copy_(value)
        if not idxs or not self._norm_masks:
            return
        for dep, midx in self._group(gid, idxs):
            mod = dep.target.module
            mask = self._norm_masks.get(mod) if isinstance(mod, nn.Module) else None
            if mask is None:
                continue
            for i in midx:
                left = mask.get(int(i), 0) - 1
                if left > 0:
                    mask[int(i)] = left
                else:
                    mask.pop(int(i), None)
            if not mask:
                del self._norm_masks[mod]
                self._norm_hooks.pop(mod).remove()

    def _masked_norm(self, mod: nn.Module, args: Any, out: Any) -> Any:
        """Forward hook: the norm's output as if its zeroed channels were removed (statistics over
        the kept channels only, zeros in the removed ones)."""
        removed = self._norm_masks.get(mod)
        x = args[0] if args else None
        dim = _norm_channel_dim(mod, x)
        if not removed or not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or dim is None:
            return None
        channels = x.shape[dim]
        keep = torch.tensor([i for i in range(channels) if i not in removed], dtype=torch.long, device=x.device)
        w: Any = getattr(mod, "weight", None)
        b: Any = getattr(mod, "bias", None)
        w = w.index_select(0, keep) if isinstance(w, torch.Tensor) else None
        b = b.index_select(0, keep) if isinstance(b, torch.Tensor) else None
        xk = x.index_select(dim, keep)
        if isinstance(mod, nn.GroupNorm):
            if len(keep) % mod.num_groups:
                return None  # unequal chunks: no pruned GroupNorm computes this; the check refuses
            y = F.group_norm(xk, mod.num_groups, w, b, mod.eps)
        else:
            eps = float(getattr(mod, "eps", 1e-5))
            y = F.layer_norm(xk.movedim(dim, -1), (len(keep),), w, b, eps).movedim(-1, dim)
        full = torch.zeros_like(out)
        return full.index_copy(dim, keep, y.to(out.dtype))

    # -- real structural pruning -----------------------------------------------------------------
    def prune_(self, gid: str, idxs: list[int]) -> None:
        """Remove channels ``idxs`` of group ``gid`` from every member: the tensors shrink. Tied
        parameters (an LM head that is the input embedding) stay tied: Torch-Pruning gives each
        owner its own smaller tensor, which would store (and count) the weight twice."""
        if idxs:
            shared = shared_parameters(self.model)
            self._group(gid, idxs).prune()
            retie_(shared)

    @contextmanager
    def pruned(self, gid: str, idxs: list[int]) -> Iterator[None]:
        """Remove channels ``idxs`` of ``gid`` for real, in place, and put every member back after.

        Torch-Pruning never changes a tensor in place: it assigns new, smaller ones (and sets
        attributes such as ``out_channels``). So keeping each member's attributes, parameter,
        buffer and submodule entries, and the graph's parameter bookkeeping, is enough to restore the
        model and the graph exactly; the pruned tensors are freed on exit. This costs no copy of the
        model and no new trace, whatever the number of groups checked.
        """
        group = self._group(gid, idxs)
        mods: dict[int, nn.Module] = {}
        for dep, _ in group:
            t = dep.target.module
            if isinstance(t, nn.Parameter):
                name = self.dg._param_to_name.get(t)
                if name is not None:  # Torch-Pruning sets the pruned parameter on its owner
                    owner = self.model.get_submodule(name.rpartition(".")[0])
                    mods[id(owner)] = owner
            elif isinstance(t, nn.Module):
                for m in t.modules():
                    mods[id(m)] = m
        # list attributes are copied: Torch-Pruning shrinks some in place (a concat's ``concat_sizes``)
        kept = [(m, {k: list(v) if isinstance(v, list) else v for k, v in vars(m).items()}, dict(m._parameters),
                 dict(m._buffers), dict(m._modules)) for m in mods.values()]
        dg = self.dg
        param_names, module2node = dict(dg._param_to_name), dict(dg.module2node)
        node_modules = [(n, n.module) for n in module2node.values() if isinstance(n.module, nn.Parameter)]
        history = len(dg._pruning_history)
        try:
            if idxs:
                group.prune()
            yield
        finally:
            for m, attrs, params, buffers, children in kept:
                for k in [k for k in vars(m) if k not in attrs]:
                    delattr(m, k)
                vars(m).update(attrs)
                entries: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = (
                    (m._parameters, params), (m._buffers, buffers), (m._modules, children))
                for live, old in entries:
                    live.clear()
                    live.update(old)
            dg._param_to_name.clear()
            dg._param_to_name.update(param_names)
            dg.module2node.clear()
            dg.module2node.update(module2node)
            for node, value in node_modules:
                node.module = value
            del dg._pruning_history[history:]

    # -- why a group is unsafe -------------------------------------------------------------------
    def unmodelled(self, gid: str) -> dict[str, list[str]]:
        """What in group ``gid`` a zeroing probe or Torch-Pruning's index mapping may get wrong:
        ``{"reshape": [...], "ops": [...], "norms": [...], "parameters": [...], "grouped": [...],
        "modules": [...]}`` (names; empty lists dropped)."""
        found: dict[str, list[str]] = {}

        def add(kind: str, what: str) -> None:
            if what not in found.setdefault(kind, []):
                found[kind].append(what)

        names = {id(p): n for p, n in self.dg._param_to_name.items()}
        for dep, _ in self._group(gid, list(range(self._channels[gid]))):
            t = dep.target.module
            kind = type(t).__name__
            if isinstance(t, nn.Parameter):
                add("parameters", names.get(id(t), "a parameter"))
            elif kind in ("_ReshapeOp", "_UnbindOp", "_SliceOp"):
                add("reshape", kind.strip("_").replace("Op", "").lower())
            elif kind == "_ElementWiseOp":
                op = str(getattr(t, "_grad_fn", "?")).replace("Backward0", "").replace("Backward1", "")
                if op == "ConstantPadNd":
                    pad = tuple(getattr(dep.target.grad_fn, "_saved_pad", ()))
                    # (W, H, C) pairs of an NCHW tensor: only the channels padded
                    channel_pad = len(pad) >= 6 and not any(pad[:4]) and any(pad[4:6])
                    add("pads", "a zero-padding of the channels (e.g. a zero-padding shortcut)"
                        if channel_pad else "a padding (ConstantPadNd)")
                elif not any(op.lower().startswith(p.lower()) for p in _PLAIN_OPS):
                    op = op.lower().replace("torch::autograd::", "")
                    add("ops", "layer_norm (functional)" if op == "nativelayernorm" else op)
            elif isinstance(t, nn.Module) and t in self._name:
                name = self._name[t]
                if isinstance(t, (nn.LayerNorm, nn.GroupNorm)) and _norm_channel_dim(t) is None:
                    add("norms", f"{type(t).__name__} {name!r}")
                elif isinstance(t, nn.modules.conv._ConvNd) and t.groups > 1 and t.groups != t.out_channels:
                    add("grouped", f"{name!r} (groups={t.groups})")
                elif not isinstance(t, (*QUANTIZABLE, *_NORM, nn.PReLU, nn.MultiheadAttention)):
                    add("modules", f"{type(t).__name__} {name!r}")
        return {k: v for k, v in found.items() if v}


def _guarded_concat_mapping(original: Callable[..., Any]) -> Callable[..., Any]:
    """Torch-Pruning's ``update_concat_index_mapping``, except that a concatenation whose input
    channel counts it cannot infer (its recursive shape inference stops at a depth limit and
    returns None) gets no index mapping, as Torch-Pruning itself does for it a few lines later,
    instead of a TypeError from ``sum`` over the None that lost the whole graph (torchvision's
    swin_s / swin_b at small inputs: the patch-merging concat after more than 7 blocks). The groups
    through that concat are marked unsafe with the reason (:meth:`PruningGraph._all_groups`); the
    others stay scannable."""

    def guarded(graph: Any, cat_node: Any) -> Any:
        import torch_pruning as tp  # lazily: it imports timm (seconds) where installed
        if cat_node.type != tp.ops.OPTYPE.CONCAT:
            return original(graph, cat_node)
        dim = getattr(cat_node.grad_fn, "_saved_dim", 1)
        if dim != 1 and dim < tp.dependency.constants.MAX_VALID_DIM:
            return original(graph, cat_node)  # not on the channel dim: Torch-Pruning leaves it alone
        if cat_node.module.concat_sizes is None:
            cat_node.module.concat_sizes = [tp.dependency.shape_infer.infer_channels_between(graph, n, cat_node)
                                            for n in cat_node.inputs]
        if any(c is None for c in cat_node.module.concat_sizes):
            # no mapping: groups through it are marked unsafe (PruningGraph._all_groups)
            graph._sensplan_unmapped = getattr(graph, "_sensplan_unmapped", set()) | {cat_node}
            return None
        return original(graph, cat_node)

    return guarded


class _IndexExplosion(RuntimeError):
    """Torch-Pruning's flatten index mapping produced more indices than any tensor has."""


class _IndexGuard:
    """While active, Torch-Pruning's group walk raises :class:`_IndexExplosion` instead of running
    away: a flatten index mapping may return at most ``limit`` indices, a group may collect at most
    ``deps`` dependencies (None: no bound), and hold at most ``TOTAL_FACTOR * limit`` indices over
    all of them.

    Through a chain of reshapes (Swin's window partition and reverse, at every block) each mapping
    multiplies the indices by its stride; Torch-Pruning then built lists of millions of indices,
    and the graph of ``swin_t`` alone took over 7.5 GB before finishing. Where channels are partly
    added to themselves (ReXNet's ``x[:, :c] += shortcut``) the walk revisits nodes with ever new
    index lists and never ends. The guard patches these two methods (and the concat mapping, see
    :func:`_guarded_concat_mapping`) for the duration of our own calls
    only, and nests (the outermost limits hold).
    """

    _depth = 0
    _originals: tuple[Any, Any, Any] = (None, None, None)
    #: a group may hold this many times ``limit`` indices over all its steps (the largest group in
    #: the torchvision zoo, a ConvNeXt or ViT residual stream, holds a few hundred thousand); past
    #: it MaxViT's groups grew to gigabytes
    TOTAL_FACTOR = 8

    def __init__(self, limit: int, deps: int | None = None) -> None:
        self.limit, self.deps = limit, deps

    def __enter__(self) -> None:
        import torch_pruning as tp  # lazily: it imports timm (seconds) where installed
        mapping_cls, group_cls = tp.dependency.index_mapping._FlattenIndexMapping, tp.dependency.group.Group
        if _IndexGuard._depth == 0:
            call, add_dep = mapping_cls.__call__, group_cls.add_dep
            limit, deps, total = self.limit, self.deps, self.TOTAL_FACTOR * self.limit

            def guarded_call(mapping: Any, idxs: Any) -> Any:
                # a forward flatten returns len(idxs) * stride indices: refuse before building them
                if not mapping.reverse and len(idxs) * mapping._stride > limit:
                    raise _IndexExplosion(f"its index mapping through reshapes grows past {limit:,} "
                                          f"indices ({len(idxs):,} x stride {mapping._stride}), as when "
                                          "tokens or windows are folded into the channel dim (e.g. "
                                          "Swin's window partition)")
                return call(mapping, idxs)

            def guarded_add_dep(group: Any, dep: Any, idxs: Any) -> Any:
                if deps is not None and len(group._group) >= deps:
                    raise _IndexExplosion(f"its dependency walk passes {deps:,} steps without closing, "
                                          "as when channels are partly added to themselves (e.g. "
                                          "ReXNet's x[:, :c] += shortcut)")
                # every index is a Python object (~170 bytes): bound what one group may hold in all
                held = getattr(group, "_sensplan_indices", 0) + len(idxs)
                if held > total:
                    raise _IndexExplosion(f"its dependency walk collects more than {total:,} channel indices "
                                          f"over its steps (a size bound: {self.TOTAL_FACTOR} x the "
                                          "per-mapping limit), as when tokens or windows are folded into "
                                          "the channel dim at every block (e.g. MaxViT's window and grid "
                                          "partitions); a very deep residual stream (a large LLM's hidden "
                                          "size) can reach it too")
                group._sensplan_indices = held
                return add_dep(group, dep, idxs)

            im = tp.dependency.index_mapping
            _IndexGuard._originals = (call, add_dep, im.update_concat_index_mapping)
            mapping_cls.__call__ = guarded_call
            group_cls.add_dep = guarded_add_dep
            im.update_concat_index_mapping = _guarded_concat_mapping(im.update_concat_index_mapping)
        _IndexGuard._depth += 1

    def __exit__(self, *exc: Any) -> None:
        import torch_pruning as tp  # lazily: it imports timm (seconds) where installed
        _IndexGuard._depth -= 1
        if _IndexGuard._depth == 0:
            tp.dependency.index_mapping._FlattenIndexMapping.__call__ = _IndexGuard._originals[0]
            tp.dependency.group.Group.add_dep = _IndexGuard._originals[1]
            tp.dependency.index_mapping.update_concat_index_mapping = _IndexGuard._originals[2]


def _norm_channel_dim(mod: nn.Module, x: torch.Tensor | None = None) -> int | None:
    """The channel dim a LayerNorm / GroupNorm normalises over, when the probe can emulate its
    pruning (one normalised dim); None otherwise. Without ``x``: whether it can, at all."""
    if isinstance(mod, nn.GroupNorm):
        return 1
    if not isinstance(mod, nn.LayerNorm) or len(mod.normalized_shape) != 1:
        return None
    if x is None:
        return -1
    channels = mod.normalized_shape[0]
    if type(mod).forward is nn.LayerNorm.forward:
        return -1 if x.shape[-1] == channels else None
    # a subclass with its own forward, e.g. torchvision's / timm's LayerNorm2d on NCHW tensors
    if x.dim() == 4 and x.shape[1] == channels and x.shape[-1] != channels:
        return 1
    return -1 if x.shape[-1] == channels else None


Zero = Callable[[torch.Tensor, torch.Tensor], None]


def _fill(dim: int) -> Zero:
    def zero(t: torch.Tensor, idx: torch.Tensor) -> None:
        t.index_fill_(dim, idx, 0.0)
    return zero


def _fill_grouped(chunk: int, rows: int, dim: int) -> Zero:
    """Zero channel ``i`` of a grouped conv's weight: position ``i % chunk`` along ``dim``, in the
    ``rows`` slices of the other channel dim that belong to chunk ``i // chunk``."""
    def zero(t: torch.Tensor, idx: torch.Tensor) -> None:
        for i in idx.tolist():
            c, local = divmod(int(i), chunk)
            t.narrow(1 - dim, c * rows, rows).select(dim, local).zero_()
    return zero


def _zero_targets(mod: nn.Module, out: bool) -> list[tuple[torch.Tensor, Zero]]:
    """(tensor, zeroing function) pairs that silence channels of ``mod``'s output (out) or input side."""
    w: Any = getattr(mod, "weight", None)
    b: Any = getattr(mod, "bias", None)
    targets: list[tuple[Any, Zero]] = []
    if isinstance(mod, (*_CONV, nn.Linear)):
        depthwise = isinstance(mod, _CONV) and mod.groups > 1 and mod.groups == mod.in_channels
        if out or depthwise:
            targets.append((w, _fill(0)))
            if b is not None:
                targets.append((b, _fill(0)))
        elif not isinstance(mod, _CONV) or mod.groups == 1:
            targets.append((w, _fill(1)))
        else:  # a grouped conv's inputs: weight (out, in / groups, ...)
            targets.append((w, _fill_grouped(mod.in_channels // mod.groups, mod.out_channels // mod.groups, 1)))
    elif isinstance(mod, _CONVT):  # weight (in, out / groups, ...)
        if not out:
            targets.append((w, _fill(0)))
        elif mod.groups == 1:
            targets.append((w, _fill(1)))
        else:
            targets.append((w, _fill_grouped(mod.out_channels // mod.groups, mod.in_channels // mod.groups, 1)))
        if out and b is not None:
            targets.append((b, _fill(0)))
    elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                          nn.modules.instancenorm._InstanceNorm)):
        if isinstance(mod, nn.LayerNorm) and _norm_channel_dim(mod) is None:
            return []
        if w is not None:
            targets.append((w, _fill(0)))
        if b is not None:
            targets.append((b, _fill(0)))
    elif isinstance(mod, nn.PReLU) and w is not None and w.numel() > 1:
        targets.append((w, _fill(0)))
    # Other modules (embeddings, custom layers): no faithful zeroing exists; the safety check
    # compares the probe with real pruning and skips the group if they differ.
    return [(t, z) for t, z in targets if isinstance(t, torch.Tensor)]


@dataclass(frozen=True)
class GroupCheck:
    """The outcome of :func:`check_group`: ``ok``, a ``reason`` when not, and how tensors shrink."""

    ok: bool
    reason: str
    shrinks: dict[str, dict[str, float]]  # state-dict key -> {dim: elements removed per channel}


def check_group(model: nn.Module, graph: PruningGraph, gid: str, n_remove: int,
                inputs: torch.Tensor, rtol: float = 1e-4, reference: torch.Tensor | None = None) -> GroupCheck:
    """Prune ``n_remove`` channels of ``gid`` for real and compare with the probe.

    A group is safe to scan when (1) structural pruning runs and the forward pass works, (2) the
    output keeps its shape, and (3) the zeroing probe gives the same outputs as the pruned model
    (within ``rtol`` of the output scale). The pruning is done in place on ``model`` (which must be
    ``graph.model``) and undone (:meth:`PruningGraph.pruned`): no copy, no new trace. ``model`` is
    left bit-identical. ``reference`` is ``model(inputs)`` when the caller already has it. Also
    returns how many elements each state-dict tensor loses per removed channel along each dim (for
    the cost model).
    """
    if model is not graph.model:
        raise ValueError("check_group needs the model the graph was built on (graph.model).")
    try:
        idxs = graph.select(gid, n_remove)
    except Exception as e:  # Torch-Pruning's importance indexes a member out of range
        first = first_line(e)
        return GroupCheck(False, f"Torch-Pruning cannot rank this group's channels ({type(e).__name__}: "
                                 f"{first}): its members disagree on the channel count. "
                                 f"{_likely_cause(graph, gid, 'breaks')} The group is not scanned or pruned.", {})
    with torch.no_grad():
        if reference is None:
            reference = model(inputs)
        before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        try:
            with graph.pruned(gid, idxs):
                pruned_out = model(inputs)
                after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        except Exception as e:  # Torch-Pruning or the forward pass broke: exactly what we guard against
            first = first_line(e)
            return GroupCheck(False, f"structural pruning of this group breaks the model ({type(e).__name__}: "
                                     f"{first}). {_likely_cause(graph, gid, 'breaks')} The group is not "
                                     f"scanned or pruned.", {})
        if not isinstance(pruned_out, torch.Tensor) or pruned_out.shape != reference.shape:
            return GroupCheck(False, "pruning this group changes the model's output shape "
                                     f"{tuple(reference.shape)} -> {tuple(getattr(pruned_out, 'shape', ()))}: "
                                     "it produces the model's outputs (e.g. the classifier's classes).", {})
        try:
            with graph.zeroed(gid, idxs):
                probe_out = model(inputs)
        except Exception as e:
            first = first_line(e)
            return GroupCheck(False, f"the zeroing probe of this group fails ({type(e).__name__}: {first}). "
                                     f"{_likely_cause(graph, gid, 'differs')} The group is not scanned or "
                                     "pruned.", {})
    scale = float(reference.abs().max()) + 1e-6
    diff = float((probe_out - pruned_out).abs().max())
    del probe_out, pruned_out
    if not diff <= rtol * scale * 10 + 1e-5:  # also catches NaN
        return GroupCheck(False, "the zeroing probe does not reproduce structural pruning for this "
                                 f"group (max output difference {diff:.3g} at output scale {scale:.3g}). "
                                 f"{_likely_cause(graph, gid, 'differs')} Its scan would not measure what "
                                 "the executor does, so it is skipped.", {})
    # Elements removed per channel along each dim: additive, so a dim shared by several groups
    # (a concatenation) shrinks by the sum of what each removes.
    shrinks = {k: {str(d): (a - b) / n_remove
                   for d, (a, b) in enumerate(zip(before[k], after[k], strict=True)) if a != b}
               for k in before if k in after and before[k] != after[k]}
    # The cost model prices any count by these per-channel rates: check them at the smallest count
    # too (shapes only). A slice of the channels (GhostNet's out[:, :c]) breaks proportionality.
    small = graph.channel_step(gid)
    if small < n_remove:
        try:
            with graph.pruned(gid, graph.select(gid, small)):
                at_small = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        except Exception:
            at_small = {}
        off = [k for k in before if k in at_small and any(
            a - b != shrinks.get(k, {}).get(str(d), 0.0) * small
            for d, (a, b) in enumerate(zip(before[k], at_small[k], strict=True)))]
        if off or not at_small:
            return GroupCheck(False, "pruning this group removes tensor elements out of proportion to its "
                                     f"channels ({off[0] if off else 'the smallest removal fails'}: "
                                     f"{n_remove} channels and {small} give different rates per channel), "
                                     "as when a slice keeps part of the channels (e.g. GhostNet's "
                                     "out[:, :c]); its costs could not be predicted, so it is skipped.", {})
    return GroupCheck(True, "", shrinks)


def _likely_cause(graph: PruningGraph, gid: str, how: str) -> str:
    """One sentence naming what in the group Torch-Pruning or the probe does not model."""
    try:
        found = graph.unmodelled(gid)
    except Exception:  # explaining must never fail the scan
        found = {}
    layout = [o for o in found.get("ops", []) if o in ("permute", "roll", "transpose", "unfold")]
    ops = [*found.get("reshape", []), *layout, *found.get("pads", []),
           *(o for o in found.get("ops", []) if o not in layout)]
    parts = []
    if ops:
        parts.append("its channels pass through operations Torch-Pruning does not map channel by channel "
                     f"({', '.join(ops[:4])}{', ...' if len(ops) > 4 else ''})")
    if found.get("grouped"):
        parts.append(f"grouped convolutions whose chunks do not line up with this group's channels "
                     f"({', '.join(found['grouped'][:2])})")
    if found.get("norms"):
        parts.append(f"norms over several dims that the probe cannot emulate ({', '.join(found['norms'][:2])})")
    if found.get("modules"):
        parts.append(f"modules Torch-Pruning has no pruner for ({', '.join(found['modules'][:2])})")
    if found.get("parameters") and how == "differs":
        parts.append(f"bare parameters on these channels ({', '.join(found['parameters'][:2])})")
    if not parts:
        return ("Cause unknown: Torch-Pruning's pruning of these channels is inconsistent."
                if how == "breaks" else
                "Likely cause: an operation on these channels turns a zeroed channel into a non-zero one "
                "(e.g. a constant added outside the group).")
    return "Likely cause: " + "; ".join(parts) + "."


def count_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per sample of each Conv/Linear layer (FQN -> MACs) for one forward.

    A conv costs (output positions) x (weight elements); a linear (output rows) x (weight elements).
    ``nn.MultiheadAttention`` runs its projections without calling its submodules, so it is
    counted by its own hook: the packed input projection (query, key and value tokens x E x E each)
    plus the two attention products (2 x L x S x E) under the attention module's name, and the
    output projection (L x E x E) under ``<name>.out_proj``. A Conv/Linear whose forward never runs
    but whose weight a parent passes to ``F.linear`` / ``F.conv*`` itself (torchvision's Swin
    attention: ``F.linear(x, self.qkv.weight)``) is counted from those calls. A module with an
    ``expected_macs(tokens_per_sample)`` method (an MoE block's experts, see ``_moe``: each runs on
    the tokens routed to it) gives its layers' counts itself, from the tokens its forward received.
    Other operations (norms, activations, pooling, additions) are not counted.
    """
    macs: dict[str, int] = {}
    hooks = []
    batch = example_input.shape[0]
    functional: dict[str, float] = {}
    # weight -> the distinct layers owning it (a module registered under two names counts once)
    owners: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, QUANTIZABLE) and isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append((name, w))

    class Functional(torch.overrides.TorchFunctionMode):
        """Counts F.linear / F.conv* calls on a layer's weight (the layer's own forward included:
        only layers whose hook never fires use these counts). A weight shared by several layers is
        not attributed to any of them: which layer "ran" is ambiguous."""

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func not in _FUNCTIONAL or not isinstance(out, torch.Tensor):
                return out
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            entries = owners.get(id(w)) if isinstance(w, torch.Tensor) else None
            if not entries or len(entries) != 1 or entries[0][1] is not w:
                return out
            if func is F.linear:
                positions = out.numel() / (batch * out.shape[-1])
            elif out.dim() < w.dim():  # an unbatched convolution (a loop over samples): its share
                positions = out.numel() / (batch * out.shape[0])
            else:
                positions = out.numel() / (batch * out.shape[1])
            name = entries[0][0]
            functional[name] = functional.get(name, 0.0) + positions * w.numel()
            return out

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            w: torch.Tensor = mod.weight  # type: ignore[assignment]
            if isinstance(mod, _CONV):
                positions = out.numel() // (batch * out.shape[1])
            elif isinstance(mod, _CONVT):
                positions = inp[0].numel() // (batch * inp[0].shape[1])
            else:
                positions = out.numel() // (batch * out.shape[-1])
            macs[name] = macs.get(name, 0) + positions * w.numel()
        return fn

    def mha_hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.MultiheadAttention, args: Any, kwargs: Any, out: Any) -> None:
            names = ("query", "key", "value")
            q, k, v = (args[i] if len(args) > i else kwargs.get(names[i]) for i in range(3))
            e = mod.embed_dim
            tokens = [t.numel() // (batch * t.shape[-1]) for t in (q, k, v)]
            proj = tokens[0] * e * e + tokens[1] * e * mod.kdim + tokens[2] * e * mod.vdim
            attention = 2 * tokens[0] * tokens[1] * e
            macs[name] = macs.get(name, 0) + proj + attention
            macs[f"{name}.out_proj"] = macs.get(f"{name}.out_proj", 0) + tokens[0] * e * e
        return fn

    tokens: dict[str, float] = {}

    def routed_hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inp: Any, out: Any) -> None:
            x = inp[0] if inp else None
            if isinstance(x, torch.Tensor) and x.dim() >= 1:
                tokens[name] = tokens.get(name, 0.0) + x.numel() / (batch * x.shape[-1])
        return fn

    attention_parts = set()
    for name, mod in model.named_modules():
        if callable(getattr(mod, "expected_macs", None)):
            hooks.append(mod.register_forward_hook(routed_hook(name)))
        if isinstance(mod, nn.MultiheadAttention):
            attention_parts.add(f"{name}.out_proj")
            hooks.append(mod.register_forward_hook(mha_hook(name), with_kwargs=True))
    for name, mod in model.named_modules():
        if isinstance(mod, QUANTIZABLE) and name not in attention_parts:
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad(), Functional():
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
    for name, v in functional.items():
        macs.setdefault(name, round(v))  # attention's out_proj is in already, from its module's hook
    for name, n in tokens.items():  # routed layers: an even share of the tokens, not this example's
        routed: Any = model.get_submodule(name)
        macs.update({f"{name}.{rel}": v for rel, v in routed.expected_macs(n).items()})
    return macs


#: the functional forms whose calls on a layer's weight are counted by :func:`count_macs`
_FUNCTIONAL = (F.linear, F.conv1d, F.conv2d, F.conv3d)


def layer_weight_key(name: str, mod: nn.Module) -> str | None:
    """The state-dict key of a layer's weight: ``.weight``, or the packed ``in_proj_weight`` of an
    attention module (None when it has separate q/k/v projection weights)."""
    if isinstance(mod, nn.MultiheadAttention):
        return f"{name}.in_proj_weight" if mod.in_proj_weight is not None else None
    return f"{name}.weight" if isinstance(getattr(mod, "weight", None), torch.Tensor) else None


def channel_graph(model: nn.Module, example_input: torch.Tensor) -> Any:
    """The channel groups of ``model``: a Hugging Face transformer's attention heads and MLP widths
    (:class:`~sensplan.sensitivity._transformers.TransformerGraph`, from its module names), else
    Torch-Pruning's traced :class:`PruningGraph`."""
    from sensplan.sensitivity._hf import HFModel
    from sensplan.sensitivity._transformers import TransformerGraph

    if isinstance(model, HFModel):
        found = TransformerGraph.of(model)
        if found is not None:
            return found
    return PruningGraph(model, example_input)
