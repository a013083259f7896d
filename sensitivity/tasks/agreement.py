"""Agreement with the original model: no labels needed.

Score: the fraction of samples whose top-1 class is the original model's (higher is better).
Loss: the mean KL divergence KL(original || compressed) of the softmax outputs (nats). A user with
unlabelled deployment images can scan and plan on those (``--task agreement``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sensplan._metric import Metric
from sensplan.sensitivity._data import EvalSet
from sensplan.sensitivity.tasks import TASKS, Task, TaskResult, run_batches


class Agreement(Task):
    name = "agreement"
    metric = Metric("agreement", True, "fraction")
    needs_labels = False
    description = ("top-1 agreement with the original model (fraction); loss: mean "
                   "KL(original || compressed) in nats")
    signals = {"kl": "KL(original || compressed) of the softmax outputs (nats)"}

    def prepare(self, model: nn.Module, data: EvalSet, batch_size: int = 500,
                device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        logp = [torch.log_softmax(lg, 1) for lg, _, _ in run_batches(model, data, batch_size, device, dtype)]
        return torch.cat(logp)

    def evaluate(self, model: nn.Module, data: EvalSet, state: Any, batch_size: int = 500,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> TaskResult:
        ref: torch.Tensor = state
        agree, kls, start = [], [], 0
        for logits, _, _ in run_batches(model, data, batch_size, device, dtype):
            r = ref[start:start + len(logits)]
            start += len(logits)
            agree.append((logits.argmax(1) == r.argmax(1)).float())
            kls.append(nn.functional.kl_div(torch.log_softmax(logits, 1), r, log_target=True,
                                            reduction="none").sum(1))
        per = torch.cat(agree) if agree else torch.zeros(0)
        kl = torch.cat(kls) if kls else torch.zeros(0)
        n = len(data)
        return TaskResult(float(per.sum()) / n, float(kl.double().sum()) / n, n, per, signals={"kl": kl})


TASKS.add("agreement", Agreement())
