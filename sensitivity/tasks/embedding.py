"""Embedding fidelity for encoders without a head: how close the compressed model's embeddings stay
to the original's.

Score: the mean cosine similarity of each sample's embedding to the original model's (higher is
better; 1 = unchanged), so a probe's drop is the mean loss of similarity, with a paired standard
error over samples. Loss: the mean squared distance of the unit-normalised embeddings (= 2 (1 -
cosine)). The model returns one embedding per sample, (batch, dim): for a Hugging Face encoder
:class:`sensplan.sensitivity._hf.HFModel` mean-pools the last hidden state over the attention mask,
as sentence-transformers models do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sensplan._metric import Metric
from sensplan.sensitivity._data import EvalSet
from sensplan.sensitivity.tasks import TASKS, Task, TaskResult, run_batches


class Embedding(Task):
    name = "embedding"
    metric = Metric("cosine", True, "cosine similarity")
    needs_labels = False
    description = ("mean cosine similarity of each embedding to the original model's (1 = unchanged); "
                   "loss: squared distance of the normalised embeddings")

    def prepare(self, model: nn.Module, data: EvalSet, batch_size: int = 500,
                device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        out = [nn.functional.normalize(e, dim=1) for e, _, _ in run_batches(model, data, batch_size, device, dtype)]
        return torch.cat(out) if out else torch.zeros(0)

    def evaluate(self, model: nn.Module, data: EvalSet, state: Any, batch_size: int = 500,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> TaskResult:
        ref: torch.Tensor = state
        cos, start = [], 0
        for e, _, _ in run_batches(model, data, batch_size, device, dtype):
            r = ref[start:start + len(e)]
            start += len(e)
            cos.append((nn.functional.normalize(e, dim=1) * r).sum(1).clamp(-1.0, 1.0))
        per = torch.cat(cos) if cos else torch.zeros(0)
        n = len(data)
        score = float(per.double().mean()) if n else 1.0
        return TaskResult(score, 2.0 * (1.0 - score), n, per)


TASKS.add("embedding", Embedding())
