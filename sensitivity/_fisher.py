"""A one-pass estimate of every probe's KL divergence from the Fisher information (``scan --fast``).

For a model whose outputs are class logits, p(y | x; θ) = softmax, a small change Δ of the
parameters moves the outputs by

    KL(p_θ ‖ p_θ+Δ) ≈ ½ Δᵀ F Δ,   F = E_x E_{y ~ p_θ(·|x)} [∇ log p(y|x) ∇ log p(y|x)ᵀ]

(F is the Fisher information; this is the second-order term, the first is zero). Its diagonal,
estimated from gradients on a few hundred calibration inputs, prices every probe that only changes
the values of parameters (quantized weights, zeroed channels, sparse weights) as ½ Σ F_ii Δ_i²,
without running the model again: the scan measures a handful of probes to map the estimate to the
task's drop and estimates the rest (HAWQ and NVIDIA ModelOpt's AutoQuantize rank layers the same
way, with a Hessian trace or a gradient score).

The labels are sampled from the model's own outputs (the Fisher of the model, not the "empirical"
Fisher of the data's labels), so no labels are needed, and the expected gradient is zero: for a
micro-batch of m samples, E[(Σᵢ gᵢ)²] = m · diag(F), so Σ_b G_b² / Σ_b m_b is unbiased. The batches
go round-robin to ``folds`` separate estimates, whose spread gives each probe's standard error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sensplan._errors import UserInputError


@dataclass(frozen=True)
class FisherDiagonal:
    """Per floating-point parameter name, ``folds`` independent estimates of diag(F), stacked on
    dimension 0 (float32, on the parameter's device); ``samples`` inputs went into them."""

    folds: dict[str, torch.Tensor]
    samples: int
    #: the parameters that received a gradient (one that never did, e.g. used under no_grad in
    #: ``forward``, has F = 0 though changing it changes the outputs: such probes are measured)
    touched: frozenset[str] = frozenset()

    @property
    def k(self) -> int:
        return next(iter(self.folds.values())).shape[0] if self.folds else 0


def fisher_diagonal(model: nn.Module, inputs: torch.Tensor, *, micro: int = 8, folds: int = 4,
                    seed: int = 0) -> FisherDiagonal:
    """diag(F) of ``model`` (which must return (batch, classes) logits) from ``inputs``, in
    micro-batches of ``micro`` inputs, with labels sampled from the model's outputs (seeded). A
    language model (text inputs (batch, 2, tokens), logits (batch, tokens, vocabulary)) counts every
    real next-token position as a sample, so the estimate is per token, as the ``perplexity`` and
    ``agreement`` tasks' ``kl``.

    The model runs in eval mode (BatchNorm on its running statistics, as the scan evaluates it).
    Nothing of the model changes: gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is
    written), and parameters frozen by the user are unfrozen only meanwhile."""
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    if not params:
        return FisherDiagonal({}, 0)
    touched: set[str] = set()
    folds = max(1, min(folds, -(-len(inputs) // micro)))
    acc = {n: torch.zeros((folds, *p.shape), dtype=torch.float32, device=p.device) for n, p in params.items()}
    counts = [0] * folds
    frozen = [p for p in params.values() if not p.requires_grad]
    was_training = model.training
    gen = torch.Generator().manual_seed(seed)
    dev = next(iter(params.values())).device
    names, tensors = list(params), list(params.values())
    try:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
        for b, start in enumerate(range(0, len(inputs), micro)):
            x = inputs[start:start + micro].to(dev)
            with torch.enable_grad():
                out = model(x)
                lm = isinstance(out, torch.Tensor) and out.dim() == 3 and x.dim() == 3 and x.shape[1] == 2
                if not lm and (not isinstance(out, torch.Tensor) or out.dim() != 2 or not out.is_floating_point()):
                    raise UserInputError(
                        f"--fast estimates from the model's class probabilities, so the model must return "
                        f"(batch, classes) logits; it returned {getattr(out, 'shape', type(out).__name__)}. "
                        f"Scan without --fast.")
                if lm:  # a language model: every real next-token position is a sample (per-token Fisher)
                    weight = (x[:, 1, 1:] * x[:, 1, :-1]).float().reshape(-1)
                    out = out[:, :-1].reshape(-1, out.shape[-1])
                else:
                    weight = torch.ones(len(x), device=out.device)
                logp = torch.log_softmax(out.float(), 1)
                y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).squeeze(1).to(logp.device)
                total = (logp.gather(1, y[:, None]).squeeze(1) * weight.to(logp.device)).sum()
                grads = torch.autograd.grad(total, tensors, allow_unused=True)
            f = b % folds
            counts[f] += int(weight.sum())
            for name, g in zip(names, grads, strict=True):
                if g is not None:
                    acc[name][f] += g.detach().float() ** 2
                    touched.add(name)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    scale = torch.tensor([1.0 / max(1, c) for c in counts], dtype=torch.float32)
    for a in acc.values():
        a *= scale.to(a.device).view(-1, *([1] * (a.dim() - 1)))
    return FisherDiagonal(acc, len(inputs), frozenset(touched))


class ProbeEstimator:
    """Inside a probe, ``estimate()`` gives ½ Σ F_ii Δ_i² of what the probe changed, with its standard
    error over the folds; or None when the probe changed anything else than parameter values (it
    swapped a module, installed a hook, changed a buffer or a shape) or a parameter no gradient
    reaches: such probes are measured. Only methods that declare ``values_only`` are asked."""

    def __init__(self, model: nn.Module, fisher: FisherDiagonal) -> None:
        self.model, self.fisher = model, fisher
        self.params = dict(model.named_parameters())
        self.originals = {n: p.detach().clone() for n, p in self.params.items() if n in fisher.folds}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.modules = [id(m) for m in model.modules()]
        self.hooks = _hooks(model)

    def estimate(self) -> tuple[float, float] | None:
        now = dict(self.model.named_parameters())
        if now.keys() != self.params.keys() or any(now[n] is not p for n, p in self.params.items()):
            return None
        if [id(m) for m in self.model.modules()] != self.modules or _hooks(self.model) != self.hooks:
            return None
        for n, b in self.model.named_buffers():
            old = self.buffers.get(n)
            if old is None or old.shape != b.shape or not torch.equal(old, b):
                return None
        per_fold = torch.zeros(self.fisher.k, dtype=torch.float64)
        for n, original in self.originals.items():
            p = now[n].detach()
            if p.shape != original.shape:
                return None
            delta = (p - original).float()
            if not bool(delta.any()):
                continue
            if n not in self.fisher.touched:  # no gradient reaches it: the estimate would say "free"
                return None
            f = self.fisher.folds[n]
            per_fold += 0.5 * (f * (delta * delta).unsqueeze(0)).flatten(1).sum(1).double().cpu()
        k = max(1, self.fisher.k)
        mean = float(per_fold.mean())
        se = float(per_fold.std(unbiased=True)) / k ** 0.5 if k > 1 else 0.0
        return mean, se


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_backward_hooks", {}))
               for m in model.modules())
