"""``sensplan demo``: train a small residual CNN on scikit-learn's digits, then run the pipeline.

Everything is offline: the digits ship with scikit-learn. On 2 CPU cores the whole demo takes
well under a few minutes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sensplan._artifacts import atomic_write
from sensplan._errors import UserInputError
from sensplan.sensitivity import DataSpec, ModelSpec, build_model, evaluate, load_eval_set, train_loader

DEMO_MODEL = "sensplan:digits_cnn"


def train_digits_model(seed: int = 0, epochs: int = 30) -> nn.Module:
    """Train ``sensplan:digits_cnn`` on ``digits:train`` (Adam, cosine decay): about 98% test
    top-1."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec(DEMO_MODEL)).train()
    loader = train_loader(DataSpec.parse("digits:train"), 64, seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_demo_model(out: str | Path, seed: int = 0, threads: int | None = None) -> Path:
    """Train ``sensplan:digits_cnn`` and save its weights into ``out``; return their path.

    ``threads``: CPU threads for torch (default: the CLI's, min(4, available cores)).
    """
    from sensplan.cli._common import default_threads

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads or default_threads())
    t0 = time.perf_counter()
    print("training sensplan:digits_cnn on digits:train ...", file=sys.stderr, flush=True)
    model = train_digits_model(seed)
    top1 = evaluate(model, load_eval_set(DataSpec.parse("digits:test"), None)).top1
    weights = out / "digits_cnn.pt"
    atomic_write(weights, lambda f: torch.save(model.state_dict(), f))
    print(f"trained in {time.perf_counter() - t0:.1f} s: top-1 {top1:.4f} on digits:test; "
          f"weights {weights}", file=sys.stderr, flush=True)
    return weights


def demo_argv(out: str | Path, weights: str | Path, budgets: Sequence[str] = ("macs=0.5",),
              epochs: int = 2, seed: int = 0, timing: bool = True,
              threads: int | None = None) -> list[str]:
    """The ``sensplan run`` command line of the demo's pipeline."""
    argv = ["run", "--model", DEMO_MODEL, "--weights", str(weights), "--data", "digits:test",
            "--samples", "300", "--train-data", "digits:train", "--epochs", str(epochs),
            "--calib-samples", "500", "--seed", str(seed), "--out", str(out)]
    for b in budgets:
        argv += ["--budget", b]
    if not timing:
        argv.append("--no-timing")
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv


def run_demo(out: str | Path, budgets: Sequence[str] = ("macs=0.5",), epochs: int = 2,
             seed: int = 0, timing: bool = True, threads: int | None = None) -> Path:
    """Train, save the weights, then ``sensplan run`` on them; return the report's path."""
    from sensplan.cli import main

    weights = train_demo_model(out, seed, threads)
    code = main(demo_argv(out, weights, budgets, epochs, seed, timing, threads))
    if code != 0:
        raise UserInputError(f"The demo's pipeline run failed (exit code {code}); see the message "
                             f"above.")
    return Path(out) / "report" / "report.html"
