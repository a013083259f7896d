"""Evaluate a classifier on in-memory data: top-1 accuracy (fraction) and mean cross-entropy loss."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sensplan.sensitivity._data import EvalSet, block_spans

_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Stop glibc from returning and re-mapping large buffers between forward passes.

    glibc's default malloc unmaps every freed activation buffer above 128 KiB and maps it again on
    the next batch; measured on ResNet-20 that costs ~1.65x in evaluation time. Raising the mmap and
    trim thresholds (as ``MALLOC_MMAP_THRESHOLD_`` would at start-up) keeps them in the heap.
    Does nothing off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # musl or another libc: keep the defaults
        pass
    _MALLOC_TUNED = True


def channels_last_wins(model: nn.Module, x: torch.Tensor, batch_size: int = 500,
                       dtype: torch.dtype | None = None, margin: float = 1.1, trial: int = 64) -> bool:
    """Whether ``model`` (in eval mode) runs clearly faster on channels-last inputs than on
    contiguous ones, with the same outputs: a timed trial on ``trial`` items of ``x``.

    Channels-last (NHWC) inputs let oneDNN and cuDNN run convolutions without reordering every
    activation; measured on 2 CPU cores (bench/bench_layout.py), ResNet-20 evaluates 1.25x faster,
    torchvision's CNNs 1.14-1.80x, ConvNeXt-T 1.00x. So it is timed, not assumed: each layout runs the
    trial three times (the first warms up), and channels-last wins when its best time is below the
    contiguous layout's by ``margin``. A model that fails on channels-last inputs (one that
    ``.view()``s an activation, say), or whose outputs differ by more than rounding, keeps
    contiguous inputs. Only 4-D floating-point inputs of a model with a 2-D convolution qualify.

    The answer is kept for the process, per architecture, input shape, device and dtype: the scan
    and the verifiers of one run measure in the same order (the layouts' results differ by float
    rounding, about 1e-7 relative, so a borderline model timed again elsewhere may round apart).
    """
    if x.dim() != 4 or not len(x) or not x.is_floating_point() or \
            not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    dev = device_of(model)
    half = dtype if dtype is not None and dtype != torch.float32 else None  # float32 is no autocast
    key = (type(model).__qualname__, tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
           tuple(x.shape[1:]), str(dev), str(half), min(trial, batch_size))
    if key not in _LAYOUT:
        _LAYOUT[key] = _channels_last_faster(model, x, dev, batch_size, dtype, margin, trial)
    return _LAYOUT[key]


#: channels_last_wins's answers in this process
_LAYOUT: dict[tuple[Any, ...], bool] = {}


def _channels_last_faster(model: nn.Module, x: torch.Tensor, dev: torch.device, batch_size: int,
                          dtype: torch.dtype | None, margin: float, trial: int) -> bool:
    import time
    from contextlib import nullcontext

    batch = x[: max(1, min(trial, batch_size, len(x)))].to(dev)
    layouts = {"contiguous": batch.contiguous(), "channels_last": batch.contiguous(memory_format=torch.channels_last)}
    fp16 = dtype is not None and dtype != torch.float32
    best: dict[str, float] = {}
    outs: dict[str, Any] = {}
    tune_malloc()
    try:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype) if fp16 else nullcontext():
            for round_ in range(3):
                for name, inp in layouts.items():
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t = time.perf_counter()
                    outs[name] = model(inp)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if round_:  # the first round warms up
                        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    except Exception:  # noqa: BLE001 - a model that cannot take channels-last inputs keeps contiguous ones
        return False
    a, b = outs["contiguous"], outs["channels_last"]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape):
        return False
    a, b = a.float(), b.float()
    tol = 1e-2 if fp16 else 1e-4
    if not bool(torch.isfinite(a).all()) or float((a - b).abs().max()) > tol * max(1.0, float(a.abs().max())):
        return False
    return best["channels_last"] * margin < best["contiguous"]


@dataclass(frozen=True)
class EvalResult:
    """``top1`` in [0, 1], ``loss`` the mean cross-entropy (nats), over ``n`` samples; ``correct``
    the per-sample hits (bool tensor) when asked for."""

    top1: float
    loss: float
    n: int
    correct: torch.Tensor | None = None

    def to_dict(self) -> dict[str, float | int]:
        return {"top1": self.top1, "loss": self.loss, "n": self.n}


def paired_drop_se(base: torch.Tensor, probe: torch.Tensor) -> tuple[int, int, float]:
    """Prediction flips between two evaluations of the same samples, and the standard error of the
    top-1 difference they imply: ``(lost, gained, se)``, with ``lost`` the samples that went from
    right to wrong. ``se = sqrt(lost + gained - (lost - gained)**2 / n) / n`` (paired, McNemar-style).
    """
    n = len(base)
    lost = int((base & ~probe).sum())
    gained = int((~base & probe).sum())
    var = max(0.0, lost + gained - (lost - gained) ** 2 / n)
    return lost, gained, var ** 0.5 / n


def not_logits(out: Any) -> Exception:
    """The UserInputError for a model output that is not a (batch, classes) tensor of logits, naming
    what it is and the fix."""
    from collections.abc import Mapping

    from sensplan._errors import UserInputError

    if isinstance(out, torch.Tensor):
        what = f"a tensor of shape {tuple(out.shape)}"
    elif isinstance(out, Mapping):  # a dict (torch.fx's immutable_dict too)
        what = f"a dict with the keys {', '.join(map(repr, list(out)[:4]))}"
    elif isinstance(out, (tuple, list)):
        what = f"a {type(out).__name__} of {len(out)}"
    else:
        what = f"a {type(out).__name__}"
    if not isinstance(out, torch.Tensor):
        hint = (" Give --model a factory whose model returns the logits alone (a wrapper whose forward returns "
                "e.g. out['logits'] or out[0]).")
    else:
        hint = " For a language model use --task perplexity or agreement." if out.dim() == 3 else ""
    return UserInputError(f"The model must return a (batch, classes) tensor of logits; it returned {what}.{hint}")


@torch.inference_mode()
def evaluate(model: nn.Module, data: EvalSet, batch_size: int = 500, *, per_sample: bool = False) -> EvalResult:
    """Top-1 and mean loss of ``model`` (put in eval mode) on ``data``."""
    tune_malloc()
    model.eval()
    correct = 0
    hits = []
    loss_sum = 0.0
    for x, y in data.batches(batch_size):
        logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise not_logits(logits)
        hit = logits.argmax(1) == y
        correct += int(hit.sum())
        if per_sample:
            hits.append(hit)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    n = len(data)
    return EvalResult(correct / n, loss_sum / n, n, torch.cat(hits) if per_sample else None)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


@contextmanager
def batchnorm_state_restored(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm's running statistics and momentum on exit (bit-exactly)."""
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)})
             for m in batchnorm_modules(model)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, bufs in saved:
                m.momentum = momentum
                for k, v in bufs.items():
                    getattr(m, k).copy_(v)


BNStats = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _buffer(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:  # batchnorm_modules() returns only layers that track running statistics
        raise TypeError("a BatchNorm layer without running statistics")
    return t.clone()


@torch.no_grad()
def batchnorm_statistics(model: nn.Module, calib: EvalSet, batch_size: int = 256,
                         forward: Callable[[torch.Tensor], Any] | None = None) -> BNStats:
    """Mean and variance of every BatchNorm's input over ``calib`` (FQN -> (mean, var)), measured
    with every BatchNorm normalising by batch statistics. The model is left bit-identical.

    ``forward`` runs the model (default: ``model`` itself); a BatchNorm it does not run (one the
    scan's prefix cache skipped, or one the model never calls) is left out."""
    tune_malloc()
    names = {m: n for n, m in model.named_modules()}
    bns = batchnorm_modules(model)
    if not bns:
        return {}
    was_training = model.training
    with batchnorm_state_restored(model):
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # exact average over the calibration batches
        model.eval()
        for m in bns:
            m.train()
        hooks = [m.register_forward_pre_hook(_one_value_guard(names[m])) for m in bns]
        try:
            run = forward or model
            for start, end in block_spans(len(calib.x), batch_size):
                run(calib.x[start:end])
            stats = {names[m]: (_buffer(m.running_mean), _buffer(m.running_var)) for m in bns
                     if m.num_batches_tracked is None or int(m.num_batches_tracked) > 0}
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
    return stats


def _one_value_guard(name: str) -> Any:
    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.numel() == x.shape[1] > 0:
            from sensplan._errors import UserInputError

            raise UserInputError(
                f"BatchNorm recalibration cannot measure {name}: it sees one value per channel "
                f"(input shape {tuple(x.shape)})"
                + (" from a batch of one calibration sample" if x.shape[0] == 1 else "")
                + ". Give at least 2 "
                "calibration samples (--calib-samples), or turn recalibration off "
                "(--no-bn-recalibration).")
    return hook


@torch.no_grad()
def recalibrate_batchnorm_(model: nn.Module, calib: EvalSet | None, reference: BNStats,
                           batch_size: int = 256, forward: Callable[[torch.Tensor], Any] | None = None) -> bool:
    """Shift every BatchNorm's running statistics by how much its input statistics moved.

    Pruning channels or rounding weights shifts what each later BatchNorm sees, and its stored
    statistics go stale; re-estimating them from scratch on a few hundred images loses accuracy even
    on an unchanged model (measured: -1.7 points on ResNet-20). So we keep the trained statistics and
    correct them: ``mean += mean_now - mean_ref``, ``var *= var_now / var_ref``, with ``*_ref``
    measured the same way on ``model``'s reference (the original; ``reference``). An unchanged
    model is left as it was, up to float rounding (measured: 1.5e-8 on tiny_resnet), and a layer
    whose input statistics did not move at all is left bit for bit. ``forward``: as for
    :func:`batchnorm_statistics`. Returns False when there is nothing to recalibrate.
    """
    if calib is None or not reference:
        return False
    current = batchnorm_statistics(model, calib, batch_size, forward)
    mods = dict(model.named_modules())
    for name, (mean_now, var_now) in current.items():
        if name not in reference:
            continue
        mean_ref, var_ref = reference[name]
        if torch.equal(mean_now, mean_ref) and torch.equal(var_now, var_ref):
            continue  # what it sees did not change (e.g. it runs before the perturbed layer)
        bn = mods[name]
        if mean_ref.shape != bn.running_mean.shape:
            raise ValueError(f"BatchNorm {name} has {bn.running_mean.numel()} channels but the reference "
                             f"statistics have {mean_ref.numel()}: recalibrate before structural pruning.")
        bn.running_mean.add_(mean_now - mean_ref)
        live = var_ref > 1e-12
        safe_ref = torch.where(live, var_ref, torch.ones_like(var_ref))
        new_var = torch.where(live, bn.running_var * var_now / safe_ref, bn.running_var + (var_now - var_ref))
        bn.running_var.copy_(new_var.clamp_min(0.0))
    return True
