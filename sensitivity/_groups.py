"""The Torch-Pruning adapter: channel groups, the channel-selection criterion, the reversible
zeroing probe, real structural pruning, and the safety check that ties the two together.

All Torch-Pruning calls live here. A *group* is a set of coupled channels (Torch-Pruning's
DependencyGraph): e.g. every conv and BatchNorm that writes into one residual stream. A group is
named by its *root*: the FQN of the first Conv/Linear whose output channels define it.

Channel selection (:meth:`PruningGraph.select`) is the one criterion used by both the scanner's
probe and the executor: the group L2 magnitude (Torch-Pruning's ``GroupMagnitudeImportance``,
p=2, mean over the group's members); the ``n_remove`` channels with the smallest score go.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from sensplan._effects import n_remove_for

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
QUANTIZABLE = (*_CONV, *_CONVT, nn.Linear)

CRITERION = "group_l2_magnitude"

__all__ = ["CRITERION", "QUANTIZABLE", "PruningGraph", "check_group", "count_macs", "layer_weight_key", "n_remove_for"]


@dataclass(frozen=True)
class Member:
    """One coupled piece of a group: module FQN and whether its output or input channels move."""

    module: str
    side: str  # "out" or "in"
    kind: str  # module class name


class PruningGraph:
    """Torch-Pruning's DependencyGraph of ``model`` traced with ``example_input``, keyed by FQN.

    Building it runs one forward pass with autograd enabled (Torch-Pruning traces the graph); the
    model's parameters and buffers are not changed (the model is put in eval mode first).
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, dg: Any = None) -> None:
        model.eval()
        self.model = model
        self.example_input = example_input
        if dg is None:
            with torch.enable_grad():
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                           verbose=False)
        self.dg = dg
        self._name = {m: n for n, m in model.named_modules()}
        self._module = dict(model.named_modules())
        self._roots: dict[str, nn.Module] = {}
        self._channels: dict[str, int] = {}
        self._members: dict[str, tuple[Member, ...]] = {}
        for group in self.dg.get_all_groups(root_module_types=QUANTIZABLE):
            root = group[0].dep.target.module
            gid = self._name[root]
            self._roots[gid] = root
            self._channels[gid] = len(group[0].idxs)
            self._members[gid] = tuple(self._members_of(group))

    def copy(self) -> PruningGraph:
        """A deep copy of the model with its graph, without tracing again: one ``deepcopy`` of the
        pair keeps the graph's references pointing at the copied modules."""
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
    def group_ids(self) -> list[str]:
        return list(self._roots)

    def channels(self, gid: str) -> int:
        return self._channels[gid]

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

    def _group(self, gid: str, idxs: list[int]) -> Any:
        root = self._roots[gid]
        pruner = self.dg.get_pruner_of_module(root)
        return self.dg.get_pruning_group(root, pruner.prune_out_channels, idxs)

    # -- the criterion ---------------------------------------------------------------------------
    @torch.no_grad()
    def importance(self, gid: str) -> torch.Tensor:
        """Group L2 magnitude of each of the group's channels (higher = more important)."""
        group = self._group(gid, list(range(self._channels[gid])))
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)(group)
        if imp is None:  # a group with no weights of its own: nothing to rank by, keep order
            return torch.arange(self._channels[gid], 0, -1, dtype=torch.float32)
        return torch.as_tensor(imp).detach().float()

    def select(self, gid: str, n_remove: int) -> list[int]:
        """The ``n_remove`` least important channels of group ``gid`` (sorted root indices)."""
        if n_remove <= 0:
            return []
        order = torch.argsort(self.importance(gid), stable=True)
        return sorted(int(i) for i in order[:n_remove])

    # -- the reversible probe --------------------------------------------------------------------
    @contextmanager
    def zeroed(self, gid: str, idxs: list[int]) -> Iterator[None]:
        """Zero channels ``idxs`` of group ``gid`` in every member, restoring them bit-exactly after.

        Zeroing a conv's output channel, its BatchNorm's scale *and* offset, and every consumer's
        input weights makes the channel contribute exactly nothing, as its removal would.
        """
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            saved = self.zero_(gid, idxs)
            yield
        finally:
            with torch.no_grad():
                for param, value in reversed(saved):
                    param.copy_(value)

    @torch.no_grad()
    def zero_(self, gid: str, idxs: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zero channels ``idxs`` of group ``gid`` in place; return (tensor, previous value) pairs."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not idxs:
            return saved
        for dep, midx in self._group(gid, idxs):
            mod = dep.target.module
            if isinstance(mod, nn.Module):
                out = self.dg.is_out_channel_pruning_fn(dep.handler)
                for param, dim in _zero_targets(mod, out):
                    saved.append((param, param.detach().clone()))
                    param.index_fill_(dim, torch.as_tensor(midx, dtype=torch.long), 0.0)
        return saved

    # -- real structural pruning -----------------------------------------------------------------
    def prune_(self, gid: str, idxs: list[int]) -> None:
        """Remove channels ``idxs`` of group ``gid`` from every member: the tensors shrink."""
        if idxs:
            self._group(gid, idxs).prune()


def _zero_targets(mod: nn.Module, out: bool) -> list[tuple[torch.Tensor, int]]:
    """(tensor, dim) pairs that hold one slice per channel of ``mod``'s output (out) or input side."""
    w: Any = getattr(mod, "weight", None)
    b: Any = getattr(mod, "bias", None)
    targets: list[tuple[torch.Tensor, int]] = []
    if isinstance(mod, (*_CONV, nn.Linear)):
        depthwise = isinstance(mod, _CONV) and mod.groups > 1 and mod.groups == mod.in_channels
        if out or depthwise:
            targets.append((w, 0))
            if b is not None:
                targets.append((b, 0))
        elif not isinstance(mod, _CONV) or mod.groups == 1:
            targets.append((w, 1))
    elif isinstance(mod, _CONVT):
        if out:
            targets.append((w, 1))
            if b is not None:
                targets.append((b, 0))
        elif mod.groups == 1:
            targets.append((w, 0))
    elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        if w is not None:
            targets.append((w, 0))
        if b is not None:
            targets.append((b, 0))
    elif isinstance(mod, nn.PReLU) and w is not None and w.numel() > 1:
        targets.append((w, 0))
    # Other modules (LayerNorm over channels, embeddings, custom layers): no faithful zeroing
    # exists; the safety check compares the probe with real pruning and skips the group if they differ.
    return [(t, d) for t, d in targets if isinstance(t, torch.Tensor)]


@dataclass(frozen=True)
class GroupCheck:
    """The outcome of :func:`check_group`: ``ok``, a ``reason`` when not, and how tensors shrink."""

    ok: bool
    reason: str
    shrinks: dict[str, dict[str, float]]  # state-dict key -> {dim: elements removed per channel}


def check_group(model: nn.Module, graph: PruningGraph, gid: str, n_remove: int,
                inputs: torch.Tensor, rtol: float = 1e-4) -> GroupCheck:
    """Prune ``n_remove`` channels of ``gid`` for real, on a copy, and compare with the probe.

    A group is safe to scan when (1) structural pruning of a copy runs and the forward pass works,
    (2) the output keeps its shape, and (3) the zeroing probe on ``model`` gives the same outputs as
    the pruned copy (within ``rtol`` of the output scale). ``model`` is left bit-identical.
    Also returns how many elements each state-dict tensor loses per removed channel along each dim
    (for the cost model).
    """
    idxs = graph.select(gid, n_remove)
    with torch.no_grad():
        reference = model(inputs)
    try:
        clone_graph = graph.copy()
        clone = clone_graph.model
        clone_graph.prune_(gid, idxs)
        with torch.no_grad():
            pruned_out = clone(inputs)
    except Exception as e:  # Torch-Pruning or the forward pass broke: exactly what we guard against
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return GroupCheck(False, "structural pruning of this group breaks the model "
                                 f"({type(e).__name__}: {first}). Torch-Pruning coupled channels "
                                 "across an operation it does not model (e.g. a zero-padding "
                                 "shortcut), so this group is not scanned or pruned.", {})
    if not isinstance(pruned_out, torch.Tensor) or pruned_out.shape != reference.shape:
        return GroupCheck(False, "pruning this group changes the model's output shape "
                                 f"{tuple(reference.shape)} -> {tuple(getattr(pruned_out, 'shape', ()))}: "
                                 "it produces the model's outputs (e.g. the classifier's classes).", {})
    with graph.zeroed(gid, idxs), torch.no_grad():
        probe_out = model(inputs)
    scale = float(reference.abs().max()) + 1e-6
    diff = float((probe_out - pruned_out).abs().max())
    if diff > rtol * scale * 10 + 1e-5:
        return GroupCheck(False, "the zeroing probe does not reproduce structural pruning for this "
                                 f"group (max output difference {diff:.3g} at output scale {scale:.3g}), "
                                 "so its scan would not measure what the executor does.", {})
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    after = {k: tuple(v.shape) for k, v in clone.state_dict().items()}
    # Elements removed per channel along each dim: additive, so a dim shared by several groups
    # (a concatenation) shrinks by the sum of what each removes.
    shrinks = {k: {str(d): (a - b) / n_remove
                   for d, (a, b) in enumerate(zip(before[k], after[k], strict=True)) if a != b}
               for k in before if k in after and before[k] != after[k]}
    return GroupCheck(True, "", shrinks)


def count_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per sample of each Conv/Linear layer (FQN -> MACs) for one forward.

    A conv costs (output positions) x (weight elements); a linear (output rows) x (weight elements).
    ``nn.MultiheadAttention`` runs its projections without calling its submodules, so it is
    counted by its own hook: the packed input projection (query, key and value tokens x E x E each)
    plus the two attention products (2 x L x S x E) under the attention module's name, and the
    output projection (L x E x E) under ``<name>.out_proj``. Other operations (norms, activations,
    pooling, additions) are not counted.
    """
    macs: dict[str, int] = {}
    hooks = []
    batch = example_input.shape[0]

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

    attention_parts = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            attention_parts.add(f"{name}.out_proj")
            hooks.append(mod.register_forward_hook(mha_hook(name), with_kwargs=True))
    for name, mod in model.named_modules():
        if isinstance(mod, QUANTIZABLE) and name not in attention_parts:
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
    return macs


def layer_weight_key(name: str, mod: nn.Module) -> str | None:
    """The state-dict key of a layer's weight: ``.weight``, or the packed ``in_proj_weight`` of an
    attention module (None when it has separate q/k/v projection weights)."""
    if isinstance(mod, nn.MultiheadAttention):
        return f"{name}.in_proj_weight" if mod.in_proj_weight is not None else None
    return f"{name}.weight" if isinstance(getattr(mod, "weight", None), torch.Tensor) else None
