"""Agreement with the original model: no labels needed.

Score: the fraction of samples whose top-1 class is the original model's (higher is better).
Loss: the mean KL divergence KL(original || compressed) of the softmax outputs (nats). A user with
unlabelled deployment images can scan and plan on those (``--task agreement``).

On a causal language model (logits of shape (batch, tokens, vocabulary)) a sample is a text window:
its score is the fraction of its positions whose top-1 next token is the original's, its ``kl`` the
mean over its positions of KL(original || compressed) of the next-token distributions, in the coarse
form of the ``perplexity`` task (the original's top tokens plus one bucket for the rest).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sensplan._metric import Metric
from sensplan.sensitivity._data import EvalSet
from sensplan.sensitivity.tasks import TASKS, Task, TaskResult, run_batches
from sensplan.sensitivity.tasks.perplexity import lm_batches, lm_kl, lm_reference


class Agreement(Task):
    name = "agreement"
    metric = Metric("agreement", True, "fraction")
    needs_labels = False
    description = ("top-1 agreement with the original model (fraction); loss: mean "
                   "KL(original || compressed) in nats")
    signals = {"kl": "KL(original || compressed) of the softmax outputs (nats)"}

    def prepare(self, model: nn.Module, data: EvalSet, batch_size: int = 500,
                device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        if _is_language_model(model, data, device):
            return ("lm", lm_reference(model, data, batch_size, device, dtype))
        logp, top = [], []
        for lg, _, _ in run_batches(model, data, batch_size, device, dtype):
            # the top class of the logits themselves: log_softmax can round nearly equal logits
            # (a model whose outputs are all near 0) to ties, whose argmax is then another class
            top.append(lg.argmax(1))
            logp.append(torch.log_softmax(lg, 1))
        return torch.cat(logp), torch.cat(top)

    def evaluate(self, model: nn.Module, data: EvalSet, state: Any, batch_size: int = 500,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> TaskResult:
        if isinstance(state[0], str) and state[0] == "lm":
            return _lm_agreement(model, data, state[1], batch_size, device, dtype)
        ref, top = state
        agree, kls, start = [], [], 0
        for logits, _, _ in run_batches(model, data, batch_size, device, dtype):
            r = ref[start:start + len(logits)]
            agree.append((logits.argmax(1) == top[start:start + len(logits)]).float())
            start += len(logits)
            kls.append(nn.functional.kl_div(torch.log_softmax(logits, 1), r, log_target=True,
                                            reduction="none").sum(1))
        per = torch.cat(agree) if agree else torch.zeros(0)
        kl = torch.cat(kls) if kls else torch.zeros(0)
        n = len(data)
        return TaskResult(float(per.sum()) / n, float(kl.double().sum()) / n, n, per, signals={"kl": kl})


def _is_language_model(model: nn.Module, data: EvalSet, device: torch.device | None) -> bool:
    """Whether the model returns next-token logits (batch, tokens, vocabulary) on text inputs."""
    if not len(data) or data.x.dim() != 3 or data.x.shape[1] != 2 or data.x.is_floating_point():
        return False
    from sensplan.sensitivity._eval import device_of

    with torch.inference_mode():
        out = model(data.x[:1].to(device or device_of(model)))
    return isinstance(out, torch.Tensor) and out.dim() == 3


def _lm_agreement(model: nn.Module, data: EvalSet, ref: Any, batch_size: int, device: torch.device | None,
                  dtype: torch.dtype | None) -> TaskResult:
    agree, kls, start = [], [], 0
    for logits, x in lm_batches(model, data, batch_size, device, dtype):
        mask = (x[:, 1, 1:] * x[:, 1, :-1]).float()
        count = mask.sum(1).clamp_min(1.0)
        logp = torch.log_softmax(logits[:, :-1], -1)
        same = (logp.argmax(-1) == ref[1][start:start + len(x), :, 0].long()).float()
        agree.append((same * mask).sum(1) / count)
        kls.append((lm_kl(ref, start, logp) * mask).sum(1) / count)
        start += len(x)
    per = torch.cat(agree) if agree else torch.zeros(0)
    kl = torch.cat(kls) if kls else torch.zeros(0)
    n = len(data)
    return TaskResult(float(per.double().mean()) if n else 1.0, float(kl.double().mean()) if n else 0.0, n, per,
                      signals={"kl": kl})


TASKS.add("agreement", Agreement())
