"""Structured pruning of coupled channel groups (Torch-Pruning's DependencyGraph).

Setting: ``ratio``, the fraction of the group's channels removed (round half up, one kept). The
probe zeroes the chosen channels in every member (conv outputs, BatchNorm scale and offset,
consumers' inputs); the executor zeroes them, recalibrates, then removes them structurally. Both
choose channels by the group L2 magnitude (``PruningGraph.select``). A group holding a grouped
convolution or a GroupNorm loses the same positions from each of its ``channel_step`` chunks, so
its ratio is rounded per chunk. Before a group is scanned it is pruned for real (in place, then put
back) and compared with the probe; unsafe groups are skipped with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sensplan.sensitivity._groups import channel_graph, n_remove_for
from sensplan.sensitivity.methods import METHODS, Method, MethodContext, Setting, UnitInfo, ratio_setting, setting_value


@METHODS.register
class Prune(Method):
    name = "prune"
    unit_kind = "group"
    axis = "channels"
    stage = 0
    structural = True
    default_on = True
    values_only = True  # the probe zeroes channels (norms over channels get a hook: then measured)
    default_settings = tuple({"ratio": r} for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8))
    setting_key = "ratio"
    description = ("structured pruning of a coupled channel group (fraction of channels removed); on a "
                   "transformer: attention heads, MLP channels, and each MoE expert's channels")
    speed_note = "removes channels for real: fewer MACs and smaller tensors on every runtime"

    def check_setting(self, setting: Mapping[str, Any]) -> Setting:
        r = ratio_setting("prune", setting_value("prune", setting, "ratio"))
        out: Setting = {"ratio": r}
        if "n_remove" in setting:
            out["n_remove"] = int(setting["n_remove"])
        return out

    def label(self, setting: Mapping[str, Any]) -> str:
        k = setting.get("n_remove")
        return f"prune {setting['ratio']:.0%}" + (f" ({k} ch)" if k is not None else "")

    def level(self, setting: Mapping[str, Any]) -> float:
        return float(setting.get("n_remove", setting["ratio"]))

    def effect(self, setting: Mapping[str, Any], unit: UnitInfo) -> dict[str, Any]:
        return {"removed": int(setting["n_remove"])}

    def unit_settings(self, ctx: MethodContext, unit: str, settings: Sequence[Setting]) -> list[Setting]:
        out: list[Setting] = []
        channels = int(ctx.groups[unit]["channels"])
        step = int(ctx.groups[unit].get("channel_step", 1))
        round_to = int(ctx.groups[unit].get("round_to", 1))
        for s in sorted(settings, key=lambda s: float(s["ratio"])):
            k = n_remove_for(float(s["ratio"]), channels, step, round_to)
            if k > 0 and all(k != o["n_remove"] for o in out):
                out.append({"ratio": float(s["ratio"]), "n_remove": k})
        return out

    def units(self, ctx: MethodContext, settings: Sequence[Setting]) -> dict[str, str]:
        removals: dict[str, int | str] = {}
        for gid, g in ctx.groups.items():
            if ctx.graph.unsafe_reason(gid):
                removals[gid] = 0  # checked_groups gives its reason
                continue
            opts = self.unit_settings(ctx, gid, settings)
            if opts:
                removals[gid] = int(opts[-1]["n_remove"])
                continue
            step, round_to = int(g.get("channel_step", 1)), int(g.get("round_to", 1))
            chunks = (f" in {step} equal chunks ({ctx.graph.step_cause(gid)}) that must lose the same "
                      f"positions" if step > 1 else "")
            removals[gid] = (f"with --round-to {round_to}, its {g['channels']} channels{chunks} can keep only "
                             f"multiples of {math.lcm(round_to, step)}: no scanned ratio leaves such a width "
                             f"below {g['channels']}." if round_to > 1 else
                             f"only {g['channels']} channel(s): no scanned ratio removes a channel while "
                             f"keeping one." if step == 1 else
                             f"its {g['channels']} channels{chunks}: no scanned ratio removes one channel per "
                             f"chunk while keeping one.")
        return self.checked_groups(ctx, removals)

    @contextmanager
    def probe(self, ctx: MethodContext, unit: str, setting: Setting) -> Iterator[None]:
        with ctx.graph.zeroed(unit, ctx.graph.select(unit, int(setting["n_remove"]))):
            yield

    def apply_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        # every choice is made on the unpruned weights, as the scan saw them
        chosen = {g: ctx.graph.select(g, int(s["n_remove"])) for g, s in assignment.items()}
        for gid, idxs in chosen.items():
            ctx.graph.zero_(gid, idxs)
        ctx.removed.update(chosen)
        ctx.records.setdefault(self.name, {}).update(chosen)

    def finalize_(self, ctx: MethodContext, assignment: Mapping[str, Setting]) -> None:
        removed = {g: idxs for g, idxs in ctx.records.get(self.name, {}).items() if g in assignment}
        for gid, idxs in removed.items():  # stop emulating norms before any tensor shrinks
            ctx.graph.unzero_(gid, idxs, [])
        for gid, idxs in removed.items():
            ctx.graph.prune_(gid, idxs)

    def rebuild_(self, ctx: MethodContext, record: Any) -> None:
        # the original model's graph names the groups; pruning it again shrinks the same tensors
        graph = channel_graph(ctx.model, ctx.example_input)
        for gid, idxs in record.items():
            graph.prune_(gid, [int(i) for i in idxs])
