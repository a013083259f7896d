"""Image classification: top-1 accuracy against the labels, mean cross-entropy as the loss."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sensplan._metric import TOP1
from sensplan.sensitivity._data import TEXT_KINDS, EvalSet
from sensplan.sensitivity.tasks import TASKS, Task, TaskResult, run_batches


class Classification(Task):
    name = "classification"
    metric = TOP1
    needs_labels = True
    description = "top-1 accuracy against the labels (fraction); loss: mean cross-entropy (nats)"
    signals = {"loss": "cross-entropy increase (nats)",
               "kl": "KL(original || compressed) of the softmax outputs (nats)",
               "margin": "decrease of the correct class's logit margin over the best other class (logits)"}

    def prepare(self, model: nn.Module, data: EvalSet, batch_size: int = 500,
                device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        # the original's log-probabilities: the reference of the KL signal
        logp = [torch.log_softmax(lg, 1) for lg, _, _ in run_batches(model, data, batch_size, device, dtype)]
        return torch.cat(logp) if logp else None

    def baseline(self, model: nn.Module, data: EvalSet, batch_size: int = 500, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> tuple[Any, TaskResult]:
        # one forward pass: the reference log-probabilities and the original's result come from it
        refs: list[torch.Tensor] = []
        result = self._result(run_batches(model, data, batch_size, device, dtype), None, len(data), refs)
        return (torch.cat(refs) if refs else None), result

    def evaluate(self, model: nn.Module, data: EvalSet, state: Any, batch_size: int = 500,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> TaskResult:
        return self._result(run_batches(model, data, batch_size, device, dtype), state, len(data))

    @staticmethod
    def _result(batches: Iterable[tuple[torch.Tensor, torch.Tensor, Any]], ref: torch.Tensor | None,
                n: int, collect: list[torch.Tensor] | None = None) -> TaskResult:
        """The result of the batches' logits against ``ref`` (the original's log-probabilities), or,
        with ``collect``, against their own, which are appended to it (the original's baseline)."""
        hits, losses, kls, margins, start = [], [], [], [], 0
        for logits, y, _ in batches:
            hits.append((logits.argmax(1) == y).float())
            losses.append(nn.functional.cross_entropy(logits, y, reduction="none"))
            margins.append(-_margin(logits, y))  # a smaller margin is worse
            r = None
            if collect is not None:
                r = torch.log_softmax(logits, 1)
                collect.append(r)
            elif ref is not None:
                r = ref[start:start + len(logits)]
            if r is not None:
                kls.append(nn.functional.kl_div(torch.log_softmax(logits, 1), r, log_target=True,
                                                reduction="none").sum(1))
            start += len(logits)
        per = torch.cat(hits) if hits else torch.zeros(0)
        loss = torch.cat(losses) if losses else torch.zeros(0)
        signals = {"loss": loss, "margin": torch.cat(margins) if margins else torch.zeros(0)}
        if ref is not None or collect:
            signals["kl"] = torch.cat(kls) if kls else torch.zeros(0)
        return TaskResult(float(per.sum()) / n, float(loss.double().sum()) / n, n, per, signals=signals)


    def check_baseline(self, base: TaskResult, data: EvalSet) -> str | None:
        # not better than always answering the most common class: broken weights, a wrong
        # normalisation or another class order (an untrained model, or one collapsed onto one class,
        # would otherwise be scanned "successfully" with every drop 0). Within one standard error:
        # a weak but real model, or one on imbalanced data (0.92 where the majority is 0.90), passes.
        y = data.y
        if y.dim() != 1:
            return None
        counts = torch.bincount(y[y >= 0].long().cpu())
        n = int(counts.sum())
        if n < _CHANCE_MIN or int((counts > 0).sum()) < 2:
            return None  # too few labelled samples, or one class, to tell
        top = float(counts.max()) / n
        se = math.sqrt(top * (1 - top) / n)
        if base.score > top + se:
            return None
        text = str(data.description.get("kind", "")) in TEXT_KINDS
        inputs = "the label field" if text else "--mean/--std"
        return (f"The original model's top-1 on the data is {base.score:.3f}, within one standard error "
                f"({se:.3f}) of always answering the most common class ({top:.3f} of {n} samples), so every "
                f"probe would measure noise. Check --weights (the trained checkpoint), {inputs} and the class "
                f"order (--class-map); to measure changes against the model's own answers instead, use "
                f"--task agreement.")


#: fewer labelled samples than this are not checked for a chance-level baseline
_CHANCE_MIN = 50


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample: the correct class's logit minus the largest other logit."""
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return correct - others.max(1).values


TASKS.add("classification", Classification())
