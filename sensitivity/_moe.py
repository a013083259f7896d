"""Mixture-of-experts layers as ordinary layers: one ``nn.Linear`` pair per expert.

``transformers`` (5.x) stores a sparse MoE block's experts fused, as two 3-D parameters of one
module: ``gate_up_proj`` (experts x 2·intermediate x hidden) and ``down_proj`` (experts x hidden x
intermediate); Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek and most others share this layout. A unit of
sensplan is a layer with a 2-D weight, so at load time (as GPT-2's ``Conv1D`` becomes an
``nn.Linear``) :func:`split_experts_` replaces each such module by :class:`SplitExperts`: the same
function, with expert ``e``'s projections as the layers ``<experts>.<e>.gate_up_proj`` and
``<experts>.<e>.down_proj``. Every expert's weights are then units of their own (quantized,
group-wise or not, at their own width), its intermediate channels a pruning group (gate, up and
down together: see ``_transformers``), and the executor, the packed container and
``load_compressed`` treat them as any Linear. :func:`fuse_experts_` writes the fused layout back for
a ``save_pretrained`` folder.

Only the plain layout is split: concatenated gate and up, not transposed, no biases, no norm after
the experts, and the default gate (``act(gate) * up``). Other experts modules (GPT-OSS's, with
biases and a clamped gate) stay as they are, and their weights are not units.

MACs: an expert runs only on the tokens routed to it, so one forward on a small example input
would give each expert a noisy share. :meth:`SplitExperts.expected_macs` counts each expert at
``top_k / experts`` of the tokens (routing spread evenly, which a load-balanced router aims for):
the block's total is exact, ``top_k`` experts per token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sensplan.sensitivity._models import swap_module


class Expert(nn.Module):
    """One expert: ``down_proj(act(gate) * up)`` with ``gate, up = gate_up_proj(x).chunk(2)``."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)


class SplitExperts(nn.Module):
    """A fused experts module of ``transformers`` with one :class:`Expert` per expert (children
    ``"0"``, ``"1"``, ...), computing the same function: ``forward(hidden_states, top_k_index,
    top_k_weights)`` adds each routed expert's output, weighted, to its tokens.
    ``fused_class`` is the module it replaced (to write the fused layout back)."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        gate_up: torch.Tensor = getattr(fused, "gate_up_proj")  # noqa: B009 - typed, not a module
        down: torch.Tensor = getattr(fused, "down_proj")  # noqa: B009
        n, two_i, hidden = gate_up.shape
        self.num_experts = int(n)
        self.act_fn = fused.act_fn
        self.fused_class = type(fused)
        self.fused_config = getattr(fused, "config", None)
        for e in range(self.num_experts):
            expert = Expert(int(hidden), int(two_i) // 2, gate_up.dtype, gate_up.device)
            with torch.no_grad():
                expert.gate_up_proj.weight.copy_(gate_up[e])
                expert.down_proj.weight.copy_(down[e])
            self.add_module(str(e), expert)
        self.top_k: int | None = None  # seen in a forward: the experts per token

    def expert(self, e: int) -> Expert:
        return self.get_submodule(str(e))  # type: ignore[return-value]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        self.top_k = int(top_k_index.shape[-1])
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:  # an index past the experts: a dropped token's slot
                continue
            token, slot = torch.where(top_k_index == e)
            expert = self.expert(int(e))
            gate, up = expert.gate_up_proj(hidden_states[token]).chunk(2, dim=-1)
            act: Any = self.act_fn
            y = expert.down_proj(act(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def expected_macs(self, tokens_per_sample: float) -> dict[str, int]:
        """Each expert layer's MACs per sample (relative name -> MACs) with ``tokens_per_sample``
        tokens reaching the block and ``top_k`` of the experts per token, spread evenly. Every
        ``nn.Linear`` under an expert counts (a projection factorized into two runs both)."""
        share = tokens_per_sample * (self.top_k or 1) / self.num_experts
        return {f"{e}.{n}": round(share * m.weight.numel())
                for e in range(self.num_experts) for n, m in self.expert(e).named_modules()
                if isinstance(m, nn.Linear)}


def _splittable(mod: nn.Module) -> bool:
    """A fused experts module in the plain layout (see the module docstring)."""
    gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
            and gate_up.dim() == 3 and down.dim() == 3 and callable(getattr(mod, "act_fn", None))):
        return False
    n, two_i, hidden = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (n, hidden, two_i // 2):
        return False
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    if any(getattr(mod, k, v) != v for k, v in flags.items()):
        return False
    if {n for n, _ in mod.named_parameters(recurse=False)} != {"gate_up_proj", "down_proj"}:
        return False
    gate = getattr(type(mod), "_apply_gate", None)
    return gate is None or getattr(gate, "__name__", "") == "_default_apply_gate"


def split_experts_(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` in the plain layout by the equal
    :class:`SplitExperts`, in place; returns their names."""
    names = [n for n, m in model.named_modules() if n and _splittable(m)]
    for name in names:
        swap_module(model, name, SplitExperts(model.get_submodule(name)))
    return names


def fuse_experts_(model: nn.Module, names: list[str], config: Any = None) -> str | None:
    """Undo :func:`split_experts_` for the modules ``names`` (a ``save_pretrained`` folder holds the
    fused layout): each becomes its fused class again, built from ``config`` (default: the one it
    was built with), with the experts' weights stacked. None when done, else why it cannot be (an
    expert pruned to another width than the config's, or a layer replaced)."""
    for name in names:
        split = model.get_submodule(name)
        if not isinstance(split, SplitExperts):
            continue
        experts = [split.expert(e) for e in range(split.num_experts)]
        config = config if config is not None else split.fused_config
        if config is None or not all(
                isinstance(x.gate_up_proj, nn.Linear) and isinstance(x.down_proj, nn.Linear) for x in experts):
            return f"the experts of {name} no longer fit their fused layout (a layer factorized or replaced)"
        widths = sorted({x.down_proj.in_features for x in experts})
        if len(widths) > 1:
            return (f"the experts of {name} were pruned to different widths ({widths[0]} to {widths[-1]}), "
                    f"and a transformers config holds one")
        gate_up = torch.stack([x.gate_up_proj.weight.detach() for x in experts])
        down = torch.stack([x.down_proj.weight.detach() for x in experts])
        fused: Any = split.fused_class(config)
        if fused.gate_up_proj.shape != gate_up.shape or fused.down_proj.shape != down.shape:
            return (f"the experts of {name} were pruned to {down.shape[-1]} of their {fused.down_proj.shape[-1]} "
                    f"intermediate channels, which the config's expert width does not say")
        fused.gate_up_proj = nn.Parameter(gate_up)
        fused.down_proj = nn.Parameter(down)
        swap_module(model, name, fused.to(gate_up.device))
    return None
