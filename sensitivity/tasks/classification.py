"""Image classification: top-1 accuracy against the labels, mean cross-entropy as the loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sensplan._metric import TOP1
from sensplan.sensitivity._data import EvalSet
from sensplan.sensitivity.tasks import TASKS, Task, TaskResult, run_batches


class Classification(Task):
    name = "classification"
    metric = TOP1
    needs_labels = True
    description = "top-1 accuracy against the labels (fraction); loss: mean cross-entropy (nats)"

    def evaluate(self, model: nn.Module, data: EvalSet, state: Any, batch_size: int = 500,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> TaskResult:
        hits, loss_sum = [], 0.0
        for logits, y, _ in run_batches(model, data, batch_size, device, dtype):
            hits.append((logits.argmax(1) == y).float())
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        per = torch.cat(hits) if hits else torch.zeros(0)
        n = len(data)
        return TaskResult(float(per.sum()) / n, loss_sum / n, n, per)


TASKS.add("classification", Classification())
