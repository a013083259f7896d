"""``--to torch-pruning``: the plan's channel pruning for Torch-Pruning, replayable with its own pruner.

The file has a ``pruning_ratio_dict`` (group root module name -> fraction of its channels removed,
what ``tp.pruner.MetaPruner(pruning_ratio_dict=...)`` takes once the names are turned into modules)
and, per group, the exact channel indices to remove (``idxs``, in the unpruned numbering of the
root's output channels): the ``n_remove`` channels of smallest group L2 magnitude,
``GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)`` on the unpruned weights,
ties broken by index, the same positions from each ``channel_step`` chunk (docs/formats.md). A
ratio alone does not pin the channels (Torch-Pruning rounds ``ratio * channels`` its own way, and its
pruners re-score after each step); the indices do. :func:`replay_torch_pruning` removes them with
``tp.DependencyGraph`` and ``get_pruning_group(root, prune_out_channels, idxs)``, and gives the
shapes and outputs of sensplan's executor without recalibration.

Computing the indices needs the model (the exporter loads the plan's model); this module imports
torch only then.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sensplan._errors import IncompatibleModelError, UserInputError
from sensplan.planner.export._core import EXPORTERS, Exported, Exporter, ExportRequest, to_json

IMPORTANCE = {"class": "torch_pruning.importance.GroupMagnitudeImportance", "p": 2, "group_reduction": "mean",
              "normalizer": None, "on": "the unpruned weights", "ties": "lower channel index removed first"}


@EXPORTERS.register
class TorchPruningExporter(Exporter):
    name = "torch-pruning"
    description = ("Torch-Pruning: pruning_ratio_dict plus the exact channel indices of every pruned group "
                   "(replay with tp.DependencyGraph)")
    needs_model = True

    def export(self, request: ExportRequest) -> Exported:
        items = []
        for spec in request.layers(all_layers=False).values():
            items += request.layer_items(spec, "Torch-Pruning removes channels; it does not change how a "
                                               "layer's weights or inputs are stored")
        groups = dict(request.groups())
        out_groups: list[dict[str, Any]] = []
        if groups:
            from sensplan.sensitivity import PruningGraph, channel_graph

            loaded = request.loaded()
            graph = channel_graph(loaded.model, loaded.example_input)
            if not isinstance(graph, PruningGraph):
                items += request.group_items("these head/MLP groups come from sensplan's transformer graph, which "
                                             "Torch-Pruning's DependencyGraph does not number this way")
                groups = {}
        request.unsupported(items, "export them with a quantization target (--to onnxruntime, modelopt, "
                                   "llm-compressor ...) beside this file")
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
                out_groups.append({"root": gid, "root_type": type(loaded.model.get_submodule(gid)).__name__,
                                   "channels": channels, "channel_step": graph.channel_step(gid), "n_remove": k,
                                   "ratio": k / channels, "idxs": graph.select(gid, k),
                                   "members": [[m.module, m.side] for m in graph.members(gid)]})
        doc = {**request.header(), "importance": IMPORTANCE,
               "pruning_ratio_dict": {g["root"]: g["ratio"] for g in out_groups},
               "groups": out_groups, "dropped": request.dropped_record(),
               "replay": "from sensplan.planner.export import replay_torch_pruning; "
                         "replay_torch_pruning(model, 'this file', example_inputs)"}
        notes = [] if out_groups else ["the plan prunes no channel group: the export removes nothing"]
        return Exported(to_json(doc), notes=notes)


def replay_torch_pruning(model: Any, export: Mapping[str, Any] | str | os.PathLike[str], example_inputs: Any) -> Any:
    """Remove, in place, the channels a ``torch-pruning`` export lists, with Torch-Pruning's own
    ``DependencyGraph`` (one ``get_pruning_group(root, prune_out_channels, idxs)`` per group, in the
    file's order; each group's indices are in the unpruned numbering of its root, and groups never
    share a dimension, so the order does not change them). ``model`` must be the unpruned original
    (eval mode is set: tracing runs a forward pass). Returns ``model``.

    The same as this snippet, which needs only torch and torch_pruning::

        import json, torch_pruning as tp
        spec = json.load(open("pruning.json"))
        model.eval()
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        modules = dict(model.named_modules())
        for g in spec["groups"]:
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
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    modules = dict(model.named_modules())
    for g in spec["groups"]:
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
