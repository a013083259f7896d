"""``--to torch-pruning``: the plan's channel pruning for Torch-Pruning, replayable with its own functions.

For a traced model (a CNN: sensplan's :class:`~sensplan.sensitivity.PruningGraph`), the file has a
``pruning_ratio_dict`` (group root module name -> fraction of its channels removed, what
``tp.pruner.MetaPruner(pruning_ratio_dict=...)`` takes once the names are turned into modules) and,
per group, the exact channel indices to remove (``idxs``, in the unpruned numbering of the root's
output channels): the ``n_remove`` channels of smallest group L2 magnitude,
``GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)`` on the unpruned weights,
ties broken by index, the same positions from each ``channel_step`` chunk (docs/formats.md). A
ratio alone does not pin the channels (Torch-Pruning rounds ``ratio * channels`` its own way, and its
pruners re-score after each step); the indices do. :func:`replay_torch_pruning` removes them with
``tp.DependencyGraph`` and ``get_pruning_group(root, prune_out_channels, idxs)``.

For a Hugging Face transformer, whose attention heads and MLP widths sensplan groups from module
names (:class:`~sensplan.sensitivity._transformers.TransformerGraph`; Torch-Pruning's tracer does
not number heads this way), each group lists its ``members`` explicitly: every ``nn.Linear`` with
the side it loses (``out``: weight rows and bias; ``in``: weight columns) and the exact rows or
columns, plus the attention module's integer attributes the removal lowers (``attributes``: their
new values). :func:`replay_torch_pruning` removes them with Torch-Pruning's low-level
``tp.prune_linear_out_channels`` / ``tp.prune_linear_in_channels`` and sets the attributes. GPT-2's
``Conv1D`` projections (a Linear stored transposed) have no such function: their groups are refused.

Either replay gives the shapes and outputs of sensplan's executor, without recalibration. Computing
the indices needs the model (the exporter loads the plan's model); this module imports torch only
then.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sensplan._errors import IncompatibleModelError, UserInputError
from sensplan.planner.export._core import EXPORTERS, Exported, Exporter, ExportRequest, Unsupported, to_json

IMPORTANCE = {"class": "torch_pruning.importance.GroupMagnitudeImportance", "p": 2, "group_reduction": "mean",
              "normalizer": None, "on": "the unpruned weights", "ties": "lower channel index removed first"}
#: the criterion of a transformer's head and MLP groups (sensplan's TransformerGraph.importance)
TRANSFORMER_IMPORTANCE = {"criterion": "L2 norm of every weight and bias entry a channel owns in its group's members "
                                       "(the out side's rows and biases, the in side's columns)",
                          "on": "the unpruned weights", "ties": "lower channel index removed first"}
#: the ``kind`` of a group listed member by member (replayed without a DependencyGraph)
TRANSFORMER_KINDS = ("heads", "mlp")
CONV1D_WHY = ("GPT-2's Conv1D projections store the weight transposed, and Torch-Pruning has no pruning function "
              "for them (prune_linear_*_channels would cut the wrong dimension); apply them with `sensplan apply`, "
              "whose save_pretrained folder loads with from_pretrained")


@EXPORTERS.register
class TorchPruningExporter(Exporter):
    name = "torch-pruning"
    description = ("Torch-Pruning: the exact channel indices of every pruned group (replay with tp.DependencyGraph, "
                   "or, for transformer heads and MLPs, tp.prune_linear_out/in_channels)")
    needs_model = True

    def export(self, request: ExportRequest) -> Exported:
        items: list[Unsupported] = []
        for spec in request.layers(all_layers=False).values():
            items += request.layer_items(spec, "Torch-Pruning removes channels; it does not change how a "
                                               "layer's weights or inputs are stored")
        groups = dict(request.groups())
        out_groups: list[dict[str, Any]] = []
        transformer = False
        refused: list[str] = []
        if groups:
            from sensplan.sensitivity import PruningGraph, channel_graph

            loaded = request.loaded()
            graph = channel_graph(loaded.model, loaded.example_input)
            transformer = not isinstance(graph, PruningGraph)
            if transformer:
                refused = _conv1d_groups(request, loaded.model, graph, groups)
                items += [Unsupported(f"{groups[g]['axis']}:{g}", str(groups[g].get("label")), CONV1D_WHY)
                          for g in refused]
        request.unsupported(items, "export them with a quantization target (--to onnxruntime, modelopt, "
                                   "llm-compressor ...) beside this file")
        for gid in refused:  # dropped (unsupported raised otherwise)
            del groups[gid]
        if groups:
            known = set(graph.group_ids())
            for gid, c in groups.items():
                if gid not in known:
                    raise IncompatibleModelError(f"The plan prunes group {gid!r}, which this model does not have. "
                                                 f"Was the plan made from a scan of this model?")
                channels, k = graph.channels(gid), int(c["effect"]["removed"])
                if c.get("channels") is not None and int(c["channels"]) != channels:
                    raise IncompatibleModelError(f"Group {gid!r} has {channels} channels in this model but "
                                                 f"{c['channels']} in the plan.")
                if transformer:
                    out_groups.append(_transformer_group(request, loaded.model, graph, gid, k))
                    continue
                out_groups.append({"root": gid, "root_type": type(loaded.model.get_submodule(gid)).__name__,
                                   "channels": channels, "channel_step": graph.channel_step(gid), "n_remove": k,
                                   "ratio": k / channels, "idxs": graph.select(gid, k),
                                   "members": [[m.module, m.side] for m in graph.members(gid)]})
        doc = {**request.header(), "importance": TRANSFORMER_IMPORTANCE if transformer else IMPORTANCE,
               # MetaPruner's ratios number a traced graph's groups; a transformer's are listed member by member
               "pruning_ratio_dict": {g["root"]: g["ratio"] for g in out_groups if "kind" not in g},
               "groups": out_groups, "dropped": request.dropped_record(),
               "replay": "from sensplan.planner.export import replay_torch_pruning; "
                         "replay_torch_pruning(model, 'this file', example_inputs)"}
        notes = [] if out_groups else ["the plan prunes no channel group: the export removes nothing"]
        return Exported(to_json(doc), notes=notes)


def _conv1d_groups(request: ExportRequest, model: Any, graph: Any, groups: Mapping[str, Any]) -> list[str]:
    """The planned groups with a member that is a GPT-2 ``Conv1D`` in the user's model (sensplan's
    loader turned it into an ``nn.Linear``; ``from_pretrained`` gives the Conv1D back)."""
    conv1d = set(getattr(model, "conv1d", None) or ())
    known = set(graph.group_ids())
    return [gid for gid in groups if gid in known
            and any(request.target_name(m.module) in conv1d for m in graph.members(gid))]


def _transformer_group(request: ExportRequest, model: Any, graph: Any, gid: str, k: int) -> dict[str, Any]:
    """One head or MLP group of a transformer, member by member, in the user's model's names: the
    channels the executor removes (``graph.select``, on the unpruned weights), each Linear's rows or
    columns for them, and the attention module's integer attributes after the removal."""
    g = graph.group(gid)
    channels = graph.channels(gid)
    idxs = graph.select(gid, k)
    name = request.target_name
    members = []
    for p in g.parts:
        weight = model.get_submodule(p.module).weight
        members.append({"module": name(p.module), "side": p.side,
                        "size": int(weight.shape[0 if p.side == "out" else 1]),
                        "idxs": graph.layer_indices(gid, idxs, p.module).get(p.side, [])})
    return {"root": name(gid), "kind": g.kind, "per_channel": g.per_channel, "channels": channels, "n_remove": k,
            "ratio": k / channels, "idxs": idxs, "block": name(g.block),
            "attributes": _attributes_after(model.get_submodule(g.block), g.fix, len(idxs)),
            "members": members}


def _attributes_after(block: Any, fix: Any, removed: int) -> dict[str, int]:
    """The integer attributes of ``block`` that sensplan's ``fix`` changes when ``removed`` channels
    go (``num_heads``, ``num_attention_heads``, ``all_head_size``, ``split_size`` ...), with their
    new values: the fix runs on a shallow copy (a new attribute dict sharing the weights; the fix
    only sets plain integers), so the file states what the executor sets without repeating its
    arithmetic."""
    if fix is None or not removed:
        return {}
    before = {a: v for a, v in vars(block).items() if isinstance(v, int) and not isinstance(v, bool)}
    probe = copy.copy(block)
    fix(probe, removed)
    return {a: int(v) for a, v in vars(probe).items() if a in before and v != before[a]}


def replay_torch_pruning(model: Any, export: Mapping[str, Any] | str | os.PathLike[str],
                         example_inputs: Any = None) -> Any:
    """Remove, in place, the channels a ``torch-pruning`` export lists, with Torch-Pruning's own
    functions; ``model`` must be the unpruned original, named as in the file (for a Hugging Face
    plan, ``AutoModelForCausalLM.from_pretrained(DIR)`` or the class the folder was saved with).
    Eval mode is set. Returns ``model``.

    A traced model's groups (a CNN): Torch-Pruning's ``DependencyGraph``, traced on
    ``example_inputs``, and one ``get_pruning_group(root, prune_out_channels, idxs)`` per group in
    the file's order (each group's indices are in the unpruned numbering of its root, and groups
    never share a dimension, so the order does not change them). A transformer's head and MLP
    groups (``kind`` ``heads`` or ``mlp``): each member Linear loses its rows (``out``, with the
    bias) or columns (``in``) with ``tp.prune_linear_out_channels`` / ``tp.prune_linear_in_channels``,
    then the attention module's ``attributes`` are set; ``example_inputs`` is not needed for them.

    The same as this snippet, which needs only torch and torch_pruning::

        import json, torch_pruning as tp
        spec = json.load(open("pruning.json"))
        model.eval()
        modules = dict(model.named_modules())
        dg = None
        for g in spec["groups"]:
            if g.get("kind") in ("heads", "mlp"):          # a transformer: listed member by member
                for m in g["members"]:                      # indices in each Linear's unpruned numbering
                    prune = tp.prune_linear_out_channels if m["side"] == "out" else tp.prune_linear_in_channels
                    prune(modules[m["module"]], m["idxs"])
                for attr, value in g["attributes"].items():   # new values, e.g. BERT's num_attention_heads
                    setattr(modules[g["block"]], attr, value)
                continue
            if dg is None:                                  # a traced model (CNN)
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
            root = modules[g["root"]]
            group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs=g["idxs"])
            group.prune()
    """
    import torch
    import torch_pruning as tp

    spec: Mapping[str, Any] = export if isinstance(export, Mapping) else json.loads(Path(export).read_text())
    if spec.get("target") != "torch-pruning":
        raise UserInputError(f"This is not a torch-pruning export (target {spec.get('target')!r}). Make one with "
                             f"`sensplan export --to torch-pruning`.")
    model.eval()
    modules = dict(model.named_modules())
    listed = [g for g in spec["groups"] if g.get("kind") in TRANSFORMER_KINDS]
    traced = [g for g in spec["groups"] if g.get("kind") not in TRANSFORMER_KINDS]
    for g in listed:  # check every group before changing any
        _check_listed(modules, g)
    for g in listed:
        for m in g["members"]:
            prune = tp.prune_linear_out_channels if m["side"] == "out" else tp.prune_linear_in_channels
            prune(modules[m["module"]], [int(i) for i in m["idxs"]])
        for attr, value in (g.get("attributes") or {}).items():
            setattr(modules[g["block"]], attr, int(value))
    if not traced:
        return model
    if example_inputs is None:
        raise UserInputError("This export prunes traced channel groups: pass example_inputs (one input batch) "
                             "for Torch-Pruning's DependencyGraph.")
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    for g in traced:
        root = modules.get(g["root"])
        if root is None:
            raise IncompatibleModelError(f"The export prunes {g['root']!r}, which this model does not have.")
        pruner = dg.get_pruner_of_module(root)
        if int(pruner.get_out_channels(root)) != int(g["channels"]):
            raise IncompatibleModelError(f"{g['root']!r} has {pruner.get_out_channels(root)} output channels, "
                                         f"the export expects {g['channels']}: replay on the unpruned model.")
        group = dg.get_pruning_group(root, pruner.prune_out_channels, idxs=[int(i) for i in g["idxs"]])
        if not dg.check_pruning_group(group):
            raise IncompatibleModelError(f"Torch-Pruning refuses to prune group {g['root']!r} (it would remove "
                                         f"every channel of a layer).")
        group.prune()
    return model


def _check_listed(modules: Mapping[str, Any], g: Mapping[str, Any]) -> None:
    """Refuse a transformer group the model cannot take as listed: a member that is missing or not an
    ``nn.Linear`` (GPT-2's Conv1D), a size other than the unpruned one, an attribute the attention
    module lacks."""
    from torch import nn

    for m in g["members"]:
        mod = modules.get(m["module"])
        if mod is None:
            raise IncompatibleModelError(f"The export prunes {m['module']!r} (group {g['root']!r}), which this "
                                         f"model does not have. Load the model the plan was made from.")
        if m["side"] not in ("out", "in"):
            raise UserInputError(f"Member {m['module']!r} of group {g['root']!r} has side {m['side']!r}; a "
                                 f"torch-pruning export uses 'out' (weight rows and bias) or 'in' (weight columns).")
        if not isinstance(mod, nn.Linear):
            raise IncompatibleModelError(f"{m['module']!r} is a {type(mod).__name__}, not an nn.Linear: "
                                         f"Torch-Pruning's prune_linear_{m['side']}_channels cannot prune it.")
        size = mod.out_features if m["side"] == "out" else mod.in_features
        if int(size) != int(m["size"]) or any(not 0 <= int(i) < size for i in m["idxs"]):
            raise IncompatibleModelError(f"{m['module']!r} has {size} {'output' if m['side'] == 'out' else 'input'} "
                                         f"features, the export expects {m['size']}: replay on the unpruned model.")
    block = modules.get(g["block"])
    missing = [a for a in g.get("attributes") or {} if block is None or not hasattr(block, a)]
    if missing:
        raise IncompatibleModelError(f"The export sets {', '.join(missing)} on {g['block']!r}, which this model's "
                                     f"module does not have. Load the model the plan was made from.")
