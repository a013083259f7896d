"""Language modelling: the mean next-token negative log-likelihood (log-perplexity) on text windows.

Score: log-perplexity, the mean over windows of each window's mean token NLL (nats/token; lower is
better), so a probe's drop is the increase in log-perplexity with a paired standard error over
windows. ``extra["perplexity"]`` is exp(score). Signal ``kl``: KL(original || compressed) of the
next-token distributions, per window the mean over its tokens, on the original's ``TOP_K`` most
likely tokens of each position plus one bucket for the rest (a coarse-grained KL: never above the
full one, equal to it when the vocabulary has at most ``TOP_K`` tokens). The reference is kept in
that form, so its memory is windows x tokens x ``TOP_K``, not the vocabulary.

The model takes (batch, 2, tokens) int64 inputs (ids, attention mask) and returns logits (batch,
tokens, vocabulary), as :class:`sensplan.sensitivity._hf.HFModel` does for a causal LM. Windows are
batched so that one batch's logits stay near ``LOGITS_BUDGET`` values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from sensplan._errors import UserInputError
from sensplan._metric import Metric
from sensplan.sensitivity._data import EvalSet
from sensplan.sensitivity._eval import device_of
from sensplan.sensitivity.tasks import TASKS, Task, TaskResult

TOP_K = 256
LOGITS_BUDGET = 1 << 24  # float32 logits per forward pass (64 MB)


def lm_batches(model: nn.Module, data: EvalSet, batch_size: int, device: torch.device | None,
               dtype: torch.dtype | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits (b, tokens, vocab) float32 on the CPU, inputs (b, 2, tokens))`` in order, with
    as many windows per forward as keep the logits near ``LOGITS_BUDGET`` values."""
    from sensplan.sensitivity._eval import tune_malloc

    tune_malloc()
    model.eval()
    dev = device or device_of(model)
    use_autocast = dtype is not None and dtype != torch.float32
    if data.x.dim() != 3 or data.x.shape[1] != 2 or data.x.is_floating_point():
        raise UserInputError("The perplexity task needs tokenized text (--data text:FILE, jsonl:..., "
                             "csv:..., datasets:...) and a causal language model (--model hf:DIR).")
    step = max(1, min(batch_size, 8))  # until the vocabulary is known
    i = 0
    with torch.inference_mode():
        while i < len(data):
            x = data.x[i:i + step]
            with torch.autocast(dev.type, dtype=dtype) if use_autocast else nullcontext():
                out = model(x.to(dev, non_blocking=True))
            if not isinstance(out, torch.Tensor) or out.dim() != 3:
                raise UserInputError(f"The perplexity task needs a causal language model returning "
                                     f"(batch, tokens, vocabulary) logits; it returned "
                                     f"{getattr(out, 'shape', type(out).__name__)}. Use --task "
                                     f"embedding or classification for other models.")
            yield out.float().cpu(), x.cpu()
            i += len(x)
            step = max(1, min(batch_size, LOGITS_BUDGET // max(1, out.shape[1] * out.shape[2])))


def _targets(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and their mask (both real tokens) for positions 0..T-2."""
    ids, mask = x[:, 0], x[:, 1]
    return ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).float()


def _coarse(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` log-probabilities (and their token ids) plus the log of the rest's mass."""
    k = min(k, logp.shape[-1])
    top, idx = logp.topk(k, dim=-1)
    if k == logp.shape[-1]:
        return torch.cat([top, torch.full_like(top[..., :1], -math.inf)], -1), idx
    rest = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
    return torch.cat([top, rest], -1), idx


def lm_reference(model: nn.Module, data: EvalSet, batch_size: int, device: torch.device | None,
                 dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The original model's next-token distributions in coarse form: per window and position, its
    ``TOP_K`` largest log-probabilities plus the log of the rest's mass, and their token ids (the
    first is the original's top-1 token)."""
    refs = []
    for logits, _ in lm_batches(model, data, batch_size, device, dtype):
        lp, idx = _coarse(torch.log_softmax(logits[:, :-1], -1), TOP_K)
        refs.append((lp, idx.int()))
    if not refs:
        return None
    return torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs])


def lm_kl(ref: tuple[torch.Tensor, torch.Tensor], start: int, logp: torch.Tensor) -> torch.Tensor:
    """Per position, KL(original || model) over the coarse form of :func:`lm_reference` for the
    windows ``start ...`` of ``logp`` (the model's next-token log-probabilities)."""
    ref_lp = ref[0][start:start + len(logp)].float()
    ref_idx = ref[1][start:start + len(logp)].long()
    q_top = logp.gather(-1, ref_idx)
    if ref_idx.shape[-1] < logp.shape[-1]:
        q_rest = torch.log1p(-q_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
    else:
        q_rest = torch.full_like(q_top[..., :1], -math.inf)
    q = torch.cat([q_top, q_rest], -1)
    p = ref_lp.exp()
    return torch.where(p > 0, p * (ref_lp - q), torch.zeros_like(p)).sum(-1)


class Perplexity(Task):
    name = "perplexity"
    metric = Metric("log_perplexity", False, "nats/token")
    needs_labels = False
    description = ("log-perplexity: mean next-token NLL per window (nats/token, lower is better; "
                   "perplexity = exp); loss: the same")
    signals = {"kl": f"KL(original || compressed) of the next-token distributions (nats/token; the "
                     f"original's top {TOP_K} tokens and the rest as one bucket)"}
    # the drop is the log-perplexity increase: a continuous, paired loss; it ranked plans better than
    # the KL on the bench's GPT-2 (bench/bench_transformers.py, README)
    planning_signal = "drop"

    def prepare(self, model: nn.Module, data: EvalSet, batch_size: int = 500,
                device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        return lm_reference(model, data, batch_size, device, dtype)

    def evaluate(self, model: nn.Module, data: EvalSet, state: Any, batch_size: int = 500,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> TaskResult:
        nll, kls = [], []
        start = 0
        for logits, x in lm_batches(model, data, batch_size, device, dtype):
            tgt, m = _targets(x)
            logp = torch.log_softmax(logits[:, :-1], -1)
            tok_nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            count = m.sum(1).clamp_min(1.0)
            nll.append((tok_nll * m).sum(1) / count)
            if state is not None:
                kls.append((lm_kl(state, start, logp) * m).sum(1) / count)
            start += len(x)
        per = torch.cat(nll) if nll else torch.zeros(0)
        n = len(data)
        score = float(per.double().mean()) if n else 0.0
        signals = {"kl": torch.cat(kls)} if kls else {}
        return TaskResult(score, score, n, per, extra={"perplexity": math.exp(min(score, 700.0))},
                          signals=signals)


TASKS.add("perplexity", Perplexity())
