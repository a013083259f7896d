"""Attention-head and MLP-width groups of a transformer, from its modules' names (no tracing).

Torch-Pruning's tracer does not follow attention's reshapes into heads, so a transformer's channel
groups come from the conventions of ``transformers`` (and similar code) instead:

- **attention heads**: ``q_proj``/``k_proj``/``v_proj`` with ``o_proj`` or ``out_proj`` (Llama,
  Mistral, Qwen, OPT, GPT-J), ``query``/``key``/``value`` (or DeBERTa-v2's ``query_proj``/...) with
  the sibling ``output.dense`` (BERT, RoBERTa, ViT), DistilBERT's ``q_lin``/``k_lin``/``v_lin`` with
  ``out_lin``, a fused projection laid out [Q | K | V] (GPT-2's ``c_attn`` with ``c_proj``, Phi-3's
  ``qkv_proj`` with ``o_proj``), and a ``query_key_value`` holding each KV head's query, key and
  value rows together (GPT-NeoX, BLOOM, Falcon-40B's grouped layout; GPTBigCode's ``c_attn``
  without multi-query) with ``dense``. One channel of the group is one key-value head *with every
  query head that reads it* (grouped-query attention): the ladder is in whole KV groups. Removing
  it removes the query rows, the key and value rows and the output projection's columns. With
  multi-query attention (Falcon-7B's ``query_key_value``, StarCoder's ``c_attn``: one key and value
  head for all queries) one channel is one query head, and the shared key and value stay.
- **MLP width**: ``gate_proj``/``up_proj`` with ``down_proj`` (gated MLPs: the three are pruned
  together; Phi-3's fused ``gate_up_proj`` too), ``fc1`` with ``fc2``, ``c_fc`` with ``c_proj``,
  ``fc_in`` with ``fc_out`` (GPT-J), ``dense_h_to_4h`` with ``dense_4h_to_h`` (GPT-NeoX, Falcon,
  BLOOM), ``lin1`` with ``lin2`` (DistilBERT), BERT's ``intermediate.dense`` with ``output.dense``.
  One channel is one intermediate unit.

:class:`TransformerGraph` offers the interface of :class:`~sensplan.sensitivity._groups.PruningGraph`
that the ``prune`` method, the safety check and the executor use, so the same method scans and
removes heads and MLP channels. Zeroing a head's (or a unit's) rows and the output projection's
columns makes it contribute exactly nothing, as its removal does; the safety check
(:func:`~sensplan.sensitivity._groups.check_group`) still compares both on every group. The group
id is the first projection's name (``...self_attn.q_proj``, ``...mlp.gate_proj``); ``label`` gives
the readable form ("layer 3 heads").
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sensplan._tables import layer_index
from sensplan.sensitivity._groups import Member, ZeroingProbe, n_remove_for

Index = Callable[[list[int]], list[int]]


@dataclass(frozen=True)
class _Part:
    module: str  # FQN of an nn.Linear
    side: str  # "out": rows of the weight (and the bias); "in": columns
    index: Index  # group channels -> this side's indices


@dataclass(frozen=True)
class TGroup:
    gid: str
    kind: str  # "heads" or "mlp"
    channels: int
    parts: tuple[_Part, ...]
    block: str  # the attention / MLP module's FQN
    layer: int | None  # the transformer layer's index, when its name has one
    per_channel: str  # what one channel is, e.g. "KV head (2 query heads of 16 dims)"
    fix: Callable[[nn.Module, int], None] | None = None  # sets the module's attributes after a removal
    expert: int | None = None  # an MoE expert's index (its MLP group; see _moe)
    #: multi-query attention: a channel is one query head, and the one key and value head stays
    shared_kv: bool = False

    @property
    def label(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else self.block
        if self.expert is not None:
            return f"{where} expert {self.expert} MLP"
        return f"{where} {'heads' if self.kind == 'heads' else 'MLP'}"


def _rows(width: int, offsets: tuple[int, ...] = (0,)) -> Index:
    """Channel c -> rows [off + c * width, off + (c + 1) * width) for each offset."""
    return lambda idxs: [o + c * width + j for o in offsets for c in idxs for j in range(width)]


def _same(idxs: list[int]) -> list[int]:
    return list(idxs)


def _linear(mods: dict[str, nn.Module], name: str) -> bool:
    return isinstance(mods.get(name), nn.Linear)


def _rows_of(mods: dict[str, nn.Module], name: str) -> int:
    return int(_as_linear(mods[name], name).out_features)


def _cols_of(mods: dict[str, nn.Module], name: str) -> int:
    return int(_as_linear(mods[name], name).in_features)


def _as_linear(mod: nn.Module, name: str) -> nn.Linear:
    if not isinstance(mod, nn.Linear):
        raise TypeError(f"{name} is a {type(mod).__name__}, not the nn.Linear its group was found with")
    return mod


def _head_dim(mod: nn.Module, q_rows: int) -> int | None:
    for attr in ("head_dim", "attention_head_size", "head_size"):
        v = getattr(mod, attr, None)
        if isinstance(v, int) and v > 0 and q_rows % v == 0:
            return v
    cfg = getattr(mod, "config", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(mod, "num_heads", None)
    if isinstance(heads, int) and heads > 0 and q_rows % heads == 0:
        return q_rows // heads
    return None


def _count(obj: Any, *attrs: str) -> int | None:
    """The first of ``attrs`` that ``obj`` holds as a positive int."""
    return next((v for v in (getattr(obj, a, None) for a in attrs) if isinstance(v, int) and v > 0), None)


def _qkv_blocks(q_rows: int, kv_rows: int, qw: int, hd: int) -> Index:
    """A fused projection laid out [Q | K | V] (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``): KV head c
    -> its query heads' rows in Q and its rows in K and V."""
    return lambda idxs: [*(c * qw + j for c in idxs for j in range(qw)),
                         *(q_rows + c * hd + j for c in idxs for j in range(hd)),
                         *(q_rows + kv_rows + c * hd + j for c in idxs for j in range(hd))]


def _drop(attn: nn.Module, removed: int, q_heads: tuple[str, ...] = (), kv_heads: tuple[str, ...] = (),
          widths: tuple[str, ...] = (), per_q: int = 1, qw: int = 0) -> None:
    """Lower the attention module's int attributes after ``removed`` channels went: query-head counts
    by ``removed * per_q``, KV-head counts by ``removed``, query widths by ``removed * qw``."""
    for attrs, by in ((q_heads, removed * per_q), (kv_heads, removed), (widths, removed * qw)):
        for attr in attrs:
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, int(getattr(attn, attr)) - by)


def _attention(name: str, mod: nn.Module, mods: dict[str, nn.Module]) -> TGroup | None:
    kids = dict(mod.named_children())
    p = f"{name}." if name else ""
    out_name = q = k = v = None
    # how q, k and v lie in one fused projection: "blocks" [Q | K | V]; "grouped": each KV head's
    # query heads, then its key and value (GPT-NeoX, BLOOM, Falcon); "mqa": [Q | K | V] with one
    # KV head shared by every query head (Falcon-7B, StarCoder): a channel is then one query head
    layout = "separate"
    if all(_linear(mods, p + n) for n in ("q_proj", "k_proj", "v_proj")):
        q, k, v = p + "q_proj", p + "k_proj", p + "v_proj"
        out_name = next((p + n for n in ("o_proj", "out_proj", "dense") if _linear(mods, p + n)), None)
    elif all(_linear(mods, p + n) for n in ("q_lin", "k_lin", "v_lin", "out_lin")):  # DistilBERT
        q, k, v, out_name = p + "q_lin", p + "k_lin", p + "v_lin", p + "out_lin"
    elif all(_linear(mods, p + n) for n in ("query", "key", "value")) or \
            all(_linear(mods, p + n) for n in ("query_proj", "key_proj", "value_proj")):  # BERT; DeBERTa-v2
        q, k, v = (p + n for n in (("query", "key", "value") if _linear(mods, p + "query")
                                   else ("query_proj", "key_proj", "value_proj")))
        parent = name.rpartition(".")[0]
        cand = f"{parent}.output.dense" if parent else "output.dense"
        out_name = cand if _linear(mods, cand) else None
    elif "c_attn" in kids and _linear(mods, p + "c_attn") and _linear(mods, p + "c_proj") \
            and isinstance(getattr(mod, "split_size", None), int):
        q = k = v = p + "c_attn"
        out_name = p + "c_proj"
        # GPT-2: [Q | K | V]; GPTBigCode: one KV head (multi-query), or each head's q, k, v together
        multi = getattr(mod, "multi_query", None)
        layout = "blocks" if multi is None else "mqa" if multi else "grouped"
    elif _linear(mods, p + "qkv_proj") and _linear(mods, p + "o_proj"):  # Phi-3
        q = k = v = p + "qkv_proj"
        out_name = p + "o_proj"
        layout = "blocks"
    elif _linear(mods, p + "query_key_value") and _linear(mods, p + "dense"):
        # GPT-NeoX, BLOOM, Falcon: grouped per KV head; Falcon-7B: multi-query
        q = k = v = p + "query_key_value"
        out_name = p + "dense"
        layout = "mqa" if getattr(mod, "multi_query", False) and not getattr(mod, "new_decoder_architecture", False) \
            else "grouped"
    if q is None or k is None or v is None or out_name is None:
        return None
    q_rows = _cols_of(mods, out_name)
    if layout == "separate":
        kv_rows = _rows_of(mods, k)
        if _rows_of(mods, q) != q_rows or _rows_of(mods, v) != kv_rows:
            return None
        hd = _head_dim(mod, q_rows)
    else:
        rows = _rows_of(mods, q)
        hd = _head_dim(mod, q_rows)
        if hd is None or (rows - q_rows) % (2 * hd) or rows <= q_rows:
            return None
        kv_rows = (rows - q_rows) // 2
        declared = _count(mod, "num_key_value_heads", "num_kv_heads", "kv_heads")
        if (declared is not None and declared * hd != kv_rows) or \
                (layout == "grouped" and declared is None and kv_rows != q_rows):
            return None  # the module's own count disagrees, or the shapes alone cannot tell the layout
    if hd is None or kv_rows % hd:
        return None
    heads, kv_heads = q_rows // hd, kv_rows // hd
    if kv_heads == 0 or heads % kv_heads or (layout == "mqa" and kv_heads != 1):
        return None
    per_q = heads // kv_heads
    qw = per_q * hd
    q_heads, kv_names = ("num_heads", "num_attention_heads", "n_heads"), ("num_key_value_heads", "num_kv_heads",
                                                                           "kv_heads")
    if layout == "mqa":
        parts: tuple[_Part, ...] = (_Part(q, "out", _rows(hd)), _Part(out_name, "in", _rows(hd)))

        def fix(attn: nn.Module, removed: int) -> None:
            _drop(attn, removed, q_heads=(*q_heads, "num_key_value_groups"), widths=("embed_dim", "split_size"),
                  qw=hd)
        what = f"query head ({hd} dims; the one key and value head is shared)"
        return TGroup(q, "heads", heads, parts, name, layer_index(name), what, fix, shared_kv=True)
    if layout == "grouped":
        parts = (_Part(q, "out", _rows((per_q + 2) * hd)), _Part(out_name, "in", _rows(qw)))

        def fix(attn: nn.Module, removed: int) -> None:
            _drop(attn, removed, q_heads, kv_names, ("embed_dim", "split_size", "kv_dim"), per_q, qw)
    elif layout == "blocks":
        parts = (_Part(q, "out", _qkv_blocks(q_rows, kv_rows, qw, hd)), _Part(out_name, "in", _rows(qw)))
        # Phi-3 finds its query rows by the config's head count, a config every layer shares
        own_config = q.endswith("qkv_proj") and isinstance(getattr(getattr(mod, "config", None),
                                                                   "num_attention_heads", None), int)

        def fix(attn: nn.Module, removed: int) -> None:
            _drop(attn, removed, q_heads, kv_names, ("split_size", "embed_dim"), per_q, qw)
            if own_config:  # this module's own copy, with its own head count
                cfg: Any = copy.copy(getattr(attn, "config"))  # noqa: B009 - a transformers config
                cfg.num_attention_heads = int(cfg.num_attention_heads) - removed * per_q
                setattr(attn, "config", cfg)  # noqa: B010
    else:
        parts = (_Part(q, "out", _rows(qw)), _Part(k, "out", _rows(hd)), _Part(v, "out", _rows(hd)),
                 _Part(out_name, "in", _rows(qw)))

        def fix(attn: nn.Module, removed: int) -> None:
            _drop(attn, removed, q_heads, ("num_key_value_heads",), ("all_head_size",), per_q, qw)
    what = (f"KV head ({per_q} query heads of {hd} dims)" if per_q > 1 else f"head ({hd} dims)")
    return TGroup(q, "heads", kv_heads, parts, name, layer_index(name), what, fix)


def _mlp(name: str, mod: nn.Module, mods: dict[str, nn.Module]) -> TGroup | None:
    p = f"{name}." if name else ""
    outs: list[str] = []
    down = None
    if all(_linear(mods, p + n) for n in ("gate_proj", "up_proj", "down_proj")):
        outs, down = [p + "gate_proj", p + "up_proj"], p + "down_proj"
    elif all(_linear(mods, p + n) for n in ("c_fc", "c_proj")):
        outs, down = [p + "c_fc"], p + "c_proj"
    elif all(_linear(mods, p + n) for n in ("fc1", "fc2")):
        outs, down = [p + "fc1"], p + "fc2"
    elif all(_linear(mods, p + n) for n in ("fc_in", "fc_out")):  # GPT-J, CodeGen
        outs, down = [p + "fc_in"], p + "fc_out"
    elif all(_linear(mods, p + n) for n in ("dense_h_to_4h", "dense_4h_to_h")):  # GPT-NeoX, Falcon, BLOOM
        outs, down = [p + "dense_h_to_4h"], p + "dense_4h_to_h"
    elif all(_linear(mods, p + n) for n in ("lin1", "lin2")):  # DistilBERT
        outs, down = [p + "lin1"], p + "lin2"
    elif all(_linear(mods, p + n) for n in ("intermediate.dense", "output.dense")) and \
            any(n in dict(mod.named_children()) for n in ("attention", "crossattention")):
        outs, down = [p + "intermediate.dense"], p + "output.dense"
    elif all(_linear(mods, p + n) for n in ("gate_up_proj", "down_proj")):  # Phi-3: gate and up in one
        up, down = p + "gate_up_proj", p + "down_proj"
        width = _cols_of(mods, down)
        if _rows_of(mods, up) != 2 * width:
            return None
        fused = (_Part(up, "out", _rows(1, (0, width))), _Part(down, "in", _same))
        return TGroup(up, "mlp", width, fused, name, layer_index(name), "intermediate channel")
    if not outs or down is None:
        return None
    width = _rows_of(mods, outs[0])
    if any(_rows_of(mods, o) != width for o in outs) or _cols_of(mods, down) != width:
        return None
    parts = tuple(_Part(o, "out", _same) for o in outs) + (_Part(down, "in", _same),)
    return TGroup(outs[0], "mlp", width, parts, name, layer_index(name), "intermediate channel")


def _experts(name: str, mod: nn.Module) -> list[TGroup]:
    """Each expert of a split MoE block (see ``_moe``): its intermediate channels, the gate and up
    rows of its fused ``gate_up_proj`` (channel c: rows c and I + c) with ``down_proj``'s columns."""
    from sensplan.sensitivity._moe import SplitExperts

    if not isinstance(mod, SplitExperts):
        return []
    out = []
    for e in range(mod.num_experts):
        expert = mod.expert(e)
        if not (isinstance(expert.gate_up_proj, nn.Linear) and isinstance(expert.down_proj, nn.Linear)):
            continue
        width = int(expert.down_proj.in_features)
        if expert.gate_up_proj.out_features != 2 * width:
            continue
        p = f"{name}.{e}"
        parts = (_Part(f"{p}.gate_up_proj", "out", _rows(1, (0, width))), _Part(f"{p}.down_proj", "in", _same))
        out.append(TGroup(f"{p}.gate_up_proj", "mlp", width, parts, p, layer_index(name), "intermediate channel",
                          expert=e))
    return out


def find_groups(model: nn.Module) -> list[TGroup]:
    """The attention-head and MLP groups of ``model`` (an MoE block's: one per expert), in module
    order."""
    mods = dict(model.named_modules())
    found: list[TGroup] = []
    used: set[str] = set()
    for name, mod in model.named_modules():
        for g in (_attention(name, mod, mods), _mlp(name, mod, mods), *_experts(name, mod)):
            if g is None or any(part.module in used for part in g.parts):
                continue
            found.append(g)
            used.update(part.module for part in g.parts)
    return found


def _sliced(lin: nn.Linear, side: str, keep: torch.Tensor) -> nn.Linear:
    w = lin.weight.detach()
    if side == "out":
        new = nn.Linear(lin.in_features, len(keep), bias=lin.bias is not None, device=w.device, dtype=w.dtype)
        new.weight.data.copy_(w.index_select(0, keep))
        if lin.bias is not None:
            new.bias.data.copy_(lin.bias.detach().index_select(0, keep))
    else:
        new = nn.Linear(len(keep), lin.out_features, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
        new.weight.data.copy_(w.index_select(1, keep))
        if lin.bias is not None:
            new.bias.data.copy_(lin.bias.detach())
    new.train(lin.training)
    return new


def _squared_norms(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Per row (``dim`` 0) or column (``dim`` 1) of ``w``, the sum of its squares in float64, in
    blocks of rows (no float64 copy of the whole weight)."""
    w = w.detach()
    out = torch.zeros(w.shape[dim], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[0], 256):
        block = w[start:start + 256].double().pow(2)
        if dim == 0:
            out[start:start + len(block)] = block.sum(1)
        else:
            out += block.sum(0)
    return out


class TransformerGraph(ZeroingProbe):
    """Heads and MLP groups of a transformer behind :class:`PruningGraph`'s interface."""

    def __init__(self, model: nn.Module, groups: list[TGroup]) -> None:
        self.model = model
        self._groups = {g.gid: g for g in groups}
        self._owner_cache: dict[tuple[str, str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of(cls, model: nn.Module) -> TransformerGraph | None:
        groups = find_groups(model)
        return cls(model, groups) if groups else None

    def _lin(self, name: str) -> nn.Linear:
        return _as_linear(self.model.get_submodule(name), name)

    # -- discovery -----------------------------------------------------------------------------
    def group_ids(self) -> list[str]:
        return list(self._groups)

    def group(self, gid: str) -> TGroup:
        return self._groups[gid]

    def describe(self, gid: str) -> dict[str, Any]:
        """What the scan's ``groups`` section records besides the channel count."""
        g = self._groups[gid]
        return {"kind": g.kind, "label": g.label, "layer": g.layer, "block": g.block,
                "per_channel": g.per_channel, **({"expert": g.expert} if g.expert is not None else {})}

    def unsafe_reason(self, gid: str) -> str:
        return ""

    def channels(self, gid: str) -> int:
        return self._groups[gid].channels

    def channel_step(self, gid: str) -> int:
        return 1

    def step_cause(self, gid: str) -> str:
        return ""

    def n_remove_for(self, gid: str, ratio: float) -> int:
        return n_remove_for(ratio, self.channels(gid), 1)

    def members(self, gid: str) -> tuple[Member, ...]:
        mods = dict(self.model.named_modules())
        return tuple(Member(p.module, p.side, type(mods[p.module]).__name__) for p in self._groups[gid].parts)

    def unmodelled(self, gid: str) -> dict[str, list[str]]:
        return {}

    def layer_indices(self, gid: str, idxs: list[int], module: str) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for p in self._groups[gid].parts:
            if p.module == module and idxs:
                out[p.side] = sorted(p.index(sorted(idxs)))
        return out

    # -- the criterion ---------------------------------------------------------------------------
    @torch.no_grad()
    def importance(self, gid: str) -> torch.Tensor:
        """Each channel's L2 magnitude over every weight (and bias) entry it owns in the group: the
        squared norm of each row (or column) once, then summed per channel (``select`` asks on every
        probe; one pass over each weight, not one per channel)."""
        g = self._groups[gid]
        score = torch.zeros(g.channels, dtype=torch.float64)
        for p in g.parts:
            lin = self._lin(p.module)
            per = _squared_norms(lin.weight, 0 if p.side == "out" else 1)
            if p.side == "out" and lin.bias is not None:
                per = per + lin.bias.detach().double().pow(2)
            idx, owner = self._owners(g, p)
            score.index_add_(0, owner, per[idx.to(per.device)].cpu())
        return score.sqrt().float()

    def _owners(self, g: TGroup, p: _Part) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions of ``p``'s side that the group's channels own, and each one's channel
        (built once per group shape)."""
        key = (g.gid, p.module, p.side, g.channels)
        if key not in self._owner_cache:
            per = [p.index([c]) for c in range(g.channels)]
            self._owner_cache[key] = (torch.tensor([i for rows in per for i in rows], dtype=torch.long),
                                      torch.tensor([c for c, rows in enumerate(per) for _ in rows], dtype=torch.long))
        return self._owner_cache[key]

    def select(self, gid: str, n_remove: int) -> list[int]:
        if n_remove <= 0:
            return []
        order = torch.argsort(self.importance(gid), stable=True)[:n_remove]
        return sorted(int(i) for i in order)

    # -- the reversible probe (``zeroed``, from ZeroingProbe) -------------------------------------
    @torch.no_grad()
    def zero_(self, gid: str, idxs: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not idxs:
            return saved
        for p in self._groups[gid].parts:
            lin = self._lin(p.module)
            idx = torch.as_tensor(p.index(sorted(idxs)), dtype=torch.long, device=lin.weight.device)
            targets: list[tuple[torch.Tensor, int]] = [(lin.weight, 0 if p.side == "out" else 1)]
            if p.side == "out" and lin.bias is not None:
                targets.append((lin.bias, 0))
            for t, dim in targets:
                saved.append((t, t.detach().clone()))
                t.index_fill_(dim, idx, 0.0)
        return saved

    @torch.no_grad()
    def unzero_(self, gid: str, idxs: list[int], saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for t, value in reversed(saved):
            t.copy_(value)

    # -- real structural pruning -----------------------------------------------------------------
    def prune_(self, gid: str, idxs: list[int]) -> None:
        """Remove channels ``idxs`` of ``gid``: every member Linear is replaced by a thinner one."""
        if not idxs:
            return
        g = self._groups[gid]
        for p in g.parts:
            lin = self._lin(p.module)
            size = lin.weight.shape[0 if p.side == "out" else 1]
            drop = set(p.index(sorted(idxs)))
            keep = torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long,
                                device=lin.weight.device)
            parent, _, child = p.module.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, _sliced(lin, p.side, keep))
        if g.fix is not None:
            g.fix(self.model.get_submodule(g.block), len(idxs))
        # the thinner modules are new objects: the group's channel count shrinks with them
        self._groups[gid] = dataclasses.replace(g, channels=g.channels - len(idxs))

    @contextmanager
    def pruned(self, gid: str, idxs: list[int]) -> Iterator[None]:
        """Remove channels ``idxs`` of ``gid`` for real, in place, and put the original modules back
        after (no copy of the model)."""
        g = self._groups[gid]
        originals = [(p.module, self.model.get_submodule(p.module)) for p in g.parts]
        block = self.model.get_submodule(g.block)
        # what a fix rebinds: head counts, widths, Phi-3's own config
        attrs = {k: v for k, v in vars(block).items() if not k.startswith("_") and k != "training"}
        try:
            self.prune_(gid, idxs)
            yield
        finally:
            for name, mod in originals:
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, mod)
            vars(block).update(attrs)
            self._groups[gid] = g
