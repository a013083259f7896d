"""A channel-group method written in this file through the public API, without ``units``: the
scanner's group safety check (``Method.checked_groups``) is its, as it is ``prune``'s.

``drop_last`` removes a group's *last* channels (not the smallest, as ``prune`` does). It states its
effect as ``removed`` channels and relies on the base class for which groups it may scan: the
group that produces the model's outputs is skipped with the reason, and the tensors that shrink with
each group are recorded, so the planner prices it without ``prune`` in the scan.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from sensplan.planner import Budget, apply_plan, make_plan
from sensplan.sensitivity import Method, ModelSpec, ScanConfig, channel_graph, n_remove_for, scan
from tests.conftest import registered, seeded_model, self_labelled

SPEC = ModelSpec("sensplan:tiny_convnet", {"num_classes": 6})


class DropLast(Method):
    name = "drop_last"
    unit_kind = "group"
    axis = "channels"
    stage = 11
    structural = True
    setting_key = "ratio"
    default_settings = ({"ratio": 0.5},)

    def check_setting(self, setting):
        return {"ratio": float(setting["ratio"])}

    def effect(self, setting, unit):
        return {"removed": n_remove_for(float(setting["ratio"]), unit.channels, unit.channel_step)}

    def _last(self, ctx, unit, setting):
        n = self.effect(setting, ctx.unit_info(unit, "group"))["removed"]
        channels = ctx.groups[unit]["channels"]
        return list(range(channels - n, channels))

    @contextmanager
    def probe(self, ctx, unit, setting):
        with ctx.graph.zeroed(unit, self._last(ctx, unit, setting)):
            yield

    def apply_(self, ctx, assignment):
        chosen = {g: self._last(ctx, g, s) for g, s in assignment.items()}
        for gid, idxs in chosen.items():
            ctx.graph.zero_(gid, idxs)
        ctx.removed.update(chosen)
        ctx.records.setdefault(self.name, {}).update(chosen)

    def finalize_(self, ctx, assignment):
        removed = {g: i for g, i in ctx.records.get(self.name, {}).items() if g in assignment}
        for gid, idxs in removed.items():
            ctx.graph.unzero_(gid, idxs, [])
        for gid, idxs in removed.items():
            ctx.graph.prune_(gid, idxs)

    def rebuild_(self, ctx, record):
        graph = channel_graph(ctx.model, ctx.example_input)
        for gid, idxs in record.items():
            graph.prune_(gid, [int(i) for i in idxs])


@pytest.fixture
def drop_last():
    with registered(DropLast):
        yield


def test_a_group_plugin_without_units_is_checked_priced_and_applied(drop_last, tmp_path):
    model = seeded_model("tiny_convnet", num_classes=6)
    data = self_labelled(model, 64)
    table = scan(model, data, ScanConfig({"drop_last": [{"ratio": 0.5}]}), calib=self_labelled(model, 32, seed=9),
                 model_spec=SPEC, progress=False)
    scanned = {r["unit"] for r in table.results}
    skipped = table.methods["drop_last"]["skipped"]
    assert scanned and skipped  # the group producing the outputs is not scanned
    assert any("output" in why for why in skipped.values()), skipped
    # the safety check recorded which tensors shrink with each scanned group: the planner prices it
    shrinking = {g for t in table.tensors.values() for g in t["shrinks"]}
    assert scanned <= shrinking
    plan = make_plan(table, [Budget.parse("macs=0.8")])
    planned = plan.data["plans"]["planned"]
    assert planned["predicted"]["macs"] <= 0.8 * plan.data["original"]["macs"] * (1 + 1e-9)
    metrics = apply_plan(model, plan, data, tmp_path / "out", variant="planned", model_spec=SPEC, timing=False)
    assert metrics["after"]["macs"] == pytest.approx(planned["predicted"]["macs"])


class Broken(DropLast):
    """drop_last whose probe fails: the plug-in's bug, named in one message."""

    name = "broken_probe"

    @contextmanager
    def probe(self, ctx, unit, setting):
        raise RuntimeError("forgot to zero the channels")
        yield


def test_a_plugins_own_failure_is_one_message_naming_it(tmp_path):
    from sensplan import UserInputError

    model = seeded_model("tiny_convnet", num_classes=6)
    data = self_labelled(model, 32)
    with registered(Broken), pytest.raises(UserInputError) as err:
        scan(model, data, ScanConfig({"broken_probe": [{"ratio": 0.5}]}), model_spec=SPEC, progress=False)
    msg = str(err.value)
    assert "The compression method 'broken_probe' (registered by tests.test_group_plugin) failed in its probe" in msg
    assert "RuntimeError: forgot to zero the channels" in msg and "Fix the plug-in" in msg


def test_a_task_that_scores_nan_stops_the_scan_before_any_probe():
    import math

    from sensplan._metric import Metric
    from sensplan.sensitivity import TASKS, Task, TaskResult

    class NanTask(Task):
        name = "nan_score"
        metric = Metric("nan", True, "fraction")
        needs_labels = False

        def prepare(self, model, data, batch_size=500, device=None, dtype=None):
            return None

        def evaluate(self, model, data, state, batch_size=500, device=None, dtype=None):
            return TaskResult(math.nan, 0.0, len(data), None)

    from sensplan import UserInputError

    model = seeded_model("tiny_convnet", num_classes=6)
    TASKS.register(NanTask)
    try:
        with pytest.raises(UserInputError, match="The task 'nan_score' scores the original model nan.*Fix the task"):
            scan(model, self_labelled(model, 16), ScanConfig({"prune": [{"ratio": 0.5}]}, task="nan_score"),
                 progress=False)
    finally:
        TASKS.remove("nan_score")
