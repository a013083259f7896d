"""How verification's final choice between the plan and the uniform candidates does, on outcomes
whose truth is known.

Verification measures every candidate (up to 3 planned rounds, up to 8 uniform allocations) on the
same held-out selection split and keeps one. Whatever it keeps is measured with noise, and the best
of 8 uniform candidates on 1,250 images is partly luck (the winner's curse). This bench draws
per-sample outcomes for candidates whose true drops are set, runs the choice, and prints what the
kept candidate truly gives against the truly best uniform candidate (in points, averaged over
``--trials`` draws; positive: better than the best uniform), for a range of true plan advantages.

Two rules, in the same run on the same draws:

- **least drop** (``planner._verify._Pick``, the rule in use): the least measured drop wins, an
  exact tie goes to uniform;
- **tie to uniform** (the baseline, the rule before 2026-12-07): as above, but a plan ahead of the
  best uniform by no more than one paired standard error is a tie, and uniform is kept.

The outcomes: the original model is right on ``--base-acc`` of the samples. A candidate loses a sample
the original got right, or gains one it got wrong, through a latent score shared by all candidates
(correlation ``--rho``), so that candidates err on mostly the same samples, as compressions of one
model do; the paired standard error it gives is printed beside the results. Nothing here is fitted
to a benchmark's test split: the true drops are set by hand, in three shapes of candidate set.

Run: ``python bench/bench_pick.py [--trials 1000] [--n 1250] [--rho 0.985]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensplan.planner._verify import Measured, _Pick  # noqa: E402
from sensplan.sensitivity.tasks import paired_se  # noqa: E402

#: the true plan advantages over the best uniform candidate, in points
ADVANTAGES = (-1.0, -0.5, -0.2, 0.0, 0.2, 0.5, 1.0)
#: the uniform candidates' true drops above the best of them, in points, per shape
SHAPES = {
    "8 uniform, spread": (0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0),
    "8 uniform, 3 within 0.1": (0.0, 0.05, 0.1, 0.6, 1.0, 1.5, 2.0, 3.0),
    "3 uniform": (0.0, 0.5, 1.5),
}
#: the best uniform candidate's true drop (points); the second planned round is this much worse
BEST_UNIFORM_DROP, SECOND_ROUND = 3.0, 0.2
#: the issue's bound: never more than this many points below the best uniform
TAIL = 0.2


def outcomes(rng: np.random.Generator, drops: np.ndarray, n: int, base_acc: float, rho: float) -> np.ndarray:
    """Per-sample correctness (0/1) of each candidate, shape (len(drops), n), and of the original."""
    base = rng.random(n) < base_acc
    shared = rng.standard_normal(n)
    own = rng.standard_normal((len(drops), n))
    z = np.sqrt(rho) * shared + np.sqrt(1 - rho) * own
    gain = 0.15  # of the samples the original got wrong, the share a candidate gets right
    lose = (drops[:, None] + gain * (1 - base_acc)) / base_acc
    lost = base & (z < norm.ppf(lose))
    own2 = rng.standard_normal((len(drops), n))
    gained = ~base & (np.sqrt(rho) * -shared + np.sqrt(1 - rho) * own2 < norm.ppf(gain))
    return np.concatenate([base[None].astype(np.float32),
                           np.where(base, ~lost, gained).astype(np.float32)])


def old_rule(pick: _Pick) -> dict:
    """The baseline: the least drop, but a plan ahead of the best uniform by no more than one paired
    standard error keeps the uniform."""
    w = pick.winner
    if w["kind"] == "plan" and pick.best_uniform is not None:
        a, b = pick.measured(w), pick.measured(pick.best_uniform)
        se = paired_se(b.per_sample, a.per_sample)[2]
        if b.drop - a.drop <= se:
            return pick.best_uniform
    return w


def run(trials: int, n: int, base_acc: float, rho: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    print(f"{trials} draws per cell, {n} samples, original right on {base_acc:.0%}, correlation {rho}; "
          f"points against the truly best uniform candidate (positive: better)")
    ses = []
    for shape, gaps in SHAPES.items():
        print(f"\n== {shape} (true drops above the best: {', '.join(f'{g:g}' for g in gaps)} pt) ==")
        print(f"{'true plan advantage (pt)':>26}" + "".join(f"{a:>+8.1f}" for a in ADVANTAGES))
        rows: dict[str, list[float]] = {"least drop (in use)": [], "tie to uniform (before)": [],
                                        "oracle (truth)": []}
        tails: dict[str, list[float]] = {"least drop (in use)": [], "tie to uniform (before)": []}
        for adv in ADVANTAGES:
            plan = BEST_UNIFORM_DROP - adv
            drops = np.array([plan, plan + SECOND_ROUND, *(BEST_UNIFORM_DROP + g for g in gaps)]) / 100
            kinds = ["plan", "plan", *["uniform"] * len(gaps)]
            names = [f"plan round {i + 1}" for i in range(2)] + [f"uniform {i}" for i in range(len(gaps))]
            true = {nm: d for nm, d in zip(names, drops, strict=True)}
            got_new, got_old = [], []
            for _ in range(trials):
                per = torch.from_numpy(outcomes(rng, drops, n, base_acc, rho))
                base = per[0]
                cands = [{"name": nm, "kind": k, "sample": None, "costs": {"size": 1.0},
                          "held": Measured(float(base.mean() - p.mean()), paired_se(base, p)[2],
                                           float(p.mean()), n, p)}
                         for nm, k, p in zip(names, kinds, per[1:], strict=True)]
                pick = _Pick(cands, "held", None, "size")
                got_new.append(true[pick.winner["name"]])
                got_old.append(true[old_rule(pick)["name"]])
                if len(ses) < 200:
                    ses.append(paired_se(per[3], per[1])[2])  # plan round 1 against the best uniform
            for rule, got in (("least drop (in use)", got_new), ("tie to uniform (before)", got_old)):
                rows[rule].append(100 * (BEST_UNIFORM_DROP / 100 - np.mean(got)))
                tails[rule].append(100 * float(np.mean(BEST_UNIFORM_DROP - 100 * np.array(got) < -TAIL)))
            rows["oracle (truth)"].append(max(adv, 0.0))
        for name, vals in rows.items():
            print(f"{name:>26}" + "".join(f"{v:>+8.2f}" for v in vals))
        diff = np.array(rows["least drop (in use)"]) - np.array(rows["tie to uniform (before)"])
        print(f"{'in use minus before':>26}" + "".join(f"{v:>+8.2f}" for v in diff))
        print(f"share of draws (%) whose kept candidate is more than {TAIL} pt below the best uniform:")
        for name, vals in tails.items():
            print(f"{name:>26}" + "".join(f"{v:>8.1f}" for v in vals))
    print(f"\npaired standard error of plan against best uniform in these draws: median "
          f"{100 * float(np.median(ses)):.2f} pt (ResNet-56's plan.json at size=0.125: 0.35 pt on 1,250 images)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--n", type=int, default=1250, help="samples in the selection split")
    ap.add_argument("--base-acc", type=float, default=0.91)
    ap.add_argument("--rho", type=float, default=0.985)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    run(args.trials, args.n, args.base_acc, args.rho, args.seed)
    print(f"took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
