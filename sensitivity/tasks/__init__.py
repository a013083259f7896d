"""Tasks: how data is batched, how the model is run, and how it is scored.

A task turns a model and an :class:`~sensplan.sensitivity.EvalSet` into a :class:`TaskResult`: one
score (a :class:`~sensplan._metric.Metric` with a name, a unit and a direction), a mean loss, and
per-sample scores for paired standard errors. Register a new task with ``TASKS.register``::

    @TASKS.register
    class MyTask(Task):
        name = "my_task"
        metric = Metric("my_score", higher_is_better=True, unit="fraction")
        def evaluate(self, model, data, state, batch_size=500, device=None, dtype=None): ...

Built in: ``classification`` (top-1 against labels) and ``agreement`` (top-1 agreement with the
original model plus KL divergence; needs no labels).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sensplan._metric import Metric
from sensplan._registry import Registry
from sensplan.sensitivity._data import EvalSet
from sensplan.sensitivity._eval import device_of


@dataclass(frozen=True)
class TaskResult:
    """``score`` in the metric's unit, mean ``loss``, ``n`` samples, ``per_sample`` scores (float
    tensor, same order every call), task-specific ``extra`` numbers, and ``signals``: per signal the
    task declares (:attr:`Task.signals`), a per-sample value that grows as the model gets worse (a
    probe's signal is the mean change of it from the original's, with a paired standard error)."""

    score: float
    loss: float
    n: int
    per_sample: torch.Tensor | None = None
    extra: dict[str, float] = field(default_factory=dict)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        return {"score": self.score, "loss": self.loss, "n": self.n, **self.extra}


def paired_se(base: torch.Tensor, probe: torch.Tensor) -> tuple[int, int, float]:
    """Per-sample score changes between two evaluations of the same samples: ``(lost, gained, se)``
    with ``lost``/``gained`` the samples whose score fell/rose and ``se`` the standard error of the
    mean difference (for 0/1 scores this is McNemar's paired formula)."""
    d = (probe.double() - base.double())
    n = max(1, d.numel())
    lost, gained = int((d < 0).sum()), int((d > 0).sum())
    var = max(0.0, float((d * d).sum()) - float(d.sum()) ** 2 / n)
    return lost, gained, var ** 0.5 / n


class Task:
    """Base class: subclasses set ``name``, ``metric``, ``needs_labels`` and implement ``evaluate``."""

    name: ClassVar[str] = ""
    metric: ClassVar[Metric]
    needs_labels: ClassVar[bool] = True
    description: ClassVar[str] = ""
    #: the low-noise signals :meth:`evaluate` returns per sample (name -> what it is, with its unit):
    #: continuous, nearly additive over units, so the planner can add them up (``plan --signal``)
    signals: ClassVar[dict[str, str]] = {}
    #: what ``plan --signal auto`` adds up for this task's scans ("" = the general rule: ``kl`` when
    #: recorded, else ``drop``); a task whose score is itself a continuous loss names ``drop``
    planning_signal: ClassVar[str] = ""

    def prepare(self, model: nn.Module, data: EvalSet, batch_size: int = 500,
                device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        """Per-run state computed once on the original model (e.g. its reference outputs)."""
        return None

    def evaluate(self, model: nn.Module, data: EvalSet, state: Any, batch_size: int = 500,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> TaskResult:
        raise NotImplementedError

    def baseline(self, model: nn.Module, data: EvalSet, batch_size: int = 500, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> tuple[Any, TaskResult]:
        """:meth:`prepare` and the original's own result: ``(state, evaluate(model, data, state))``.
        A task whose state is the original's outputs may override it to run the model once."""
        state = self.prepare(model, data, batch_size, device, dtype)
        return state, self.evaluate(model, data, state, batch_size, device, dtype)

    def check_baseline(self, base: TaskResult, data: EvalSet) -> str | None:
        """Why the original's ``base`` result on ``data`` makes a scan meaningless (e.g. a score at
        chance level: every probe would measure noise), as one sentence naming the fix; None when
        it is fine. Checked before any probe runs."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric.to_dict(), "signals": dict(self.signals),
                **({"planning_signal": self.planning_signal} if self.planning_signal else {})}


def signal_changes(base: TaskResult, probe: TaskResult) -> dict[str, dict[str, float]]:
    """Per signal both results carry: the mean change from ``base`` to ``probe`` (positive =
    worse) and its paired standard error."""
    out = {}
    for name, b in base.signals.items():
        p = probe.signals.get(name)
        if p is None or p.shape != b.shape or not b.numel():
            continue
        d = (p.double() - b.double())
        n = d.numel()
        var = max(0.0, float((d * d).sum()) - float(d.sum()) ** 2 / n)
        out[name] = {"value": float(d.mean()), "se": var ** 0.5 / n}
    return out


def run_batches(model: nn.Module, data: EvalSet, batch_size: int, device: torch.device | None,
                dtype: torch.dtype | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(logits as float32 on the CPU, labels, index slice start)`` for every batch, in order.

    Inputs move to ``device``; with a 16-bit ``dtype`` the forward runs under autocast.
    """
    from sensplan.sensitivity._eval import tune_malloc

    tune_malloc()
    model.eval()
    dev = device or device_of(model)
    use_autocast = dtype is not None and dtype != torch.float32
    with torch.inference_mode():
        for i, (x, y) in enumerate(data.batches(batch_size)):
            ctx = torch.autocast(dev.type, dtype=dtype) if use_autocast else nullcontext()
            with ctx:
                out = model(x.to(dev, non_blocking=True))
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                from sensplan.sensitivity._eval import not_logits

                raise not_logits(out)
            yield out.float().cpu(), y.cpu(), torch.tensor(i * batch_size)


TASKS: Registry[Task] = Registry("task", flag="--task", entry_points="sensplan.tasks")


def load_builtin_tasks() -> None:
    """Import every module of this package (each registers its task), then the tasks other
    installed packages declare under the ``sensplan.tasks`` entry point group. Runs once."""
    TASKS.discover(__name__, __path__, Task)


def get_task(name: str, *, named_in: str = "") -> Task:
    """The registered task ``name`` (``named_in``: the file that names it, for the message when it
    is not installed)."""
    load_builtin_tasks()
    return TASKS.get(name, named_in=named_in)


__all__ = ["TASKS", "Task", "TaskResult", "get_task", "load_builtin_tasks", "paired_se", "run_batches",
           "signal_changes"]
