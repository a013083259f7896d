"""``sensplan scan``: measure the drop of every (unit, method, setting); write scan.json."""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sensplan._errors import UserInputError
from sensplan.cli._common import (
    Interrupted,
    Output,
    Problems,
    add_data_args,
    add_model_args,
    add_runtime_args,
    add_verb,
    check_data_args,
    check_file_out,
    check_outputs,
    check_runtime_args,
    command_line,
    device,
    load_data,
    load_model,
    need,
    say,
    set_threads,
)

if TYPE_CHECKING:
    from sensplan._tables import Scan
    from sensplan.cli._common import SubParsers
    from sensplan.sensitivity import EvalSet, ModelSpec, ScanConfig

EXAMPLE = """\
  sensplan scan --model examples/cifar_resnet.py:resnet20 \\
      --weights ../shared/models/cifar10/resnet20_jpeg.pt \\
      --data ../shared/data/cifar10-jpg/test --samples 2000 --out scan.json
  sensplan scan --model sensplan:digits_cnn --weights digits_cnn.pt --data digits \\
      --methods prune,weight_quant,sparsity --setting sparsity=0.5,0.9 --bits 8,4 --out scan.json
  sensplan scan --model torchvision:resnet18 --weights my.pt --model-arg num_classes=10 \\
      --data imagefolder:val/ --resize 256 --crop 224 --task agreement --device cuda --out scan.json
"""

#: the shortcut flags: flag -> (method, its attribute on args)
SHORTCUTS = {"--bits": ("weight_quant", "bits"), "--ratios": ("prune", "ratios")}


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "scan", "Measure the drop of compressing each unit (layer or channel group) "
                              "with each method and setting.", EXAMPLE)
    add_model_args(p)
    add_data_args(p)
    add_scan_args(p)
    add_runtime_args(p, dtype=True)
    p.add_argument("--out", default="scan.json", metavar="FILE",
                   help="where to write the scan table (default scan.json); finished probes are "
                        "journaled in FILE.journal")
    p.set_defaults(fn=main)


def add_scan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to scan (`sensplan methods` lists methods, settings and tasks)")
    g.add_argument("--methods", metavar="LIST",
                   help="comma-separated compression methods (default: prune,weight_quant)")
    g.add_argument("--setting", action="append", default=[], metavar="METHOD=V1,V2",
                   help="the settings to scan for one method, e.g. sparsity=0.5,0.9 (repeatable; "
                        "default: the method's default settings)")
    g.add_argument("--bits", metavar="B1,B2",
                   help="shortcut for --setting weight_quant=B1,B2 (default 8,6,4,3,2). With --model "
                        "hf:... the default is 8,6,4g128,4g64,4g32,3g128,3g32,2g32")
    g.add_argument("--ratios", metavar="R1,R2",
                   help="shortcut for --setting prune=R1,R2: fractions of each group's channels "
                        "removed (default 0.1,0.2,...,0.8)")
    g.add_argument("--no-prune", action="store_true", help="do not scan prune")
    g.add_argument("--no-quantize", action="store_true", help="do not scan weight_quant")
    g.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="keep each pruned channel group's width a multiple of N (8 or 16 suit the blocked "
                        "kernels of ONNX Runtime and oneDNN; see sensplan profile) (default 1: any width)")
    g.add_argument("--units", metavar="PATTERNS",
                   help="scan only the units whose name matches one of these comma-separated shell "
                        "patterns (a head or MLP group also by its label), e.g. '*.layers.0.*,layer 3 heads'; "
                        "the others are skipped with the reason and stay uncompressed")
    g.add_argument("--task", default="classification", metavar="NAME",
                   help="how the model is scored: classification (top-1 against the labels; "
                        "default) | agreement (top-1 agreement with the original model; no labels) | "
                        "perplexity (a causal language model on text) | embedding (an encoder: cosine "
                        "similarity to the original's embeddings)")
    g.add_argument("--batch-size", type=int, default=500, metavar="N",
                   help="evaluation batch size (default 500)")
    g.add_argument("--check-samples", type=int, default=8, metavar="N",
                   help="images the pruning safety check runs per channel group, twice (pruned and "
                        "zeroed; default 8). On a very large model the checks can take a large part "
                        "of the scan: 1 or 2 are usually enough to catch a group that cannot be pruned")
    g.add_argument("--fast", action="store_true",
                   help="estimate the probes from the Fisher information of a few hundred calibration "
                        "images instead of measuring each one (seconds instead of minutes); a few are "
                        "measured to map the estimate to the drop, and plan verifies by measurement")
    g.add_argument("--fast-measured", type=int, default=8, metavar="N",
                   help="with --fast: how many probes are measured to map the estimate to the task's "
                        "drop (default 8; at least 2)")
    g.add_argument("--cache-mb", type=float, default=2048, metavar="MIB",
                   help="memory for the activations the scan reuses between probes (each probe runs the "
                        "model only from the first layer it changes; results are bit-identical). Beyond "
                        "it they are written to a temporary folder. Default 2048; 0 turns reuse off")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="measure the probes on N local worker processes, each holding the model and the data "
                        "once and using its share of the cores (the same table as one process, up to float "
                        "rounding when the workers run fewer threads; see docs/scale.md)")
    g.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="measure the probes on --workers Ray actors instead: on a Ray started here, or on the "
                        "running cluster at ADDRESS (e.g. auto or ray://head:10001). Needs the ray extra: "
                        "pip install -e \".[ray]\"")
    g.add_argument("--no-resume", action="store_true",
                   help="start afresh instead of reusing the finished probes in the journal "
                        "(<out>.journal)")


# -- checks --------------------------------------------------------------------------------------
#: the flags that remove a default method
REMOVERS = {"prune": "--no-prune", "weight_quant": "--no-quantize"}


def _method_names(args: argparse.Namespace, problems: Problems) -> list[str] | None:
    from sensplan.sensitivity.methods import all_methods, parse_method_list

    if args.methods is None:
        names = [m.name for m in all_methods() if m.default_on]
    else:
        parsed = problems.check(lambda: parse_method_list(args.methods))
        if parsed is None:
            return None
        names = list(dict.fromkeys(parsed))
    names = [n for n in names if n not in _removed(args)]
    if not names:
        problems.add("Nothing is left to scan: --no-prune/--no-quantize removed every method of "
                     "--methods. Drop one of them, or name other methods with --methods.")
        return None
    return names


def _removed(args: argparse.Namespace) -> dict[str, str]:
    """Method -> the flag that removed it."""
    return {m: flag for m, flag in REMOVERS.items() if getattr(args, flag[2:].replace("-", "_"))}


def _overrides(args: argparse.Namespace, names: list[str], problems: Problems
               ) -> dict[str, tuple[str, str]]:
    """Method -> (the flag as the user wrote it, its comma-separated values)."""
    from sensplan.sensitivity.methods import get_method

    out: dict[str, tuple[str, str]] = {}

    def take(method: str, flag: str, values: str) -> None:
        if method in out:
            problems.add(f"{flag} and {out[method][0]} both set the settings of {method}. "
                         f"Give one.")
        elif method in _removed(args):
            problems.add(f"{flag} sets the settings of {method}, but {_removed(args)[method]} "
                         f"removes {method}. Drop one of them.")
        elif method not in names:
            problems.add(f"{flag}: {method} is not among the methods scanned ({', '.join(names)}). "
                         f"Add it with --methods {','.join([*names, method])}, or drop {flag}.")
        else:
            out[method] = (flag, values)

    for item in args.setting:
        method, sep, values = item.partition("=")
        method = method.strip()
        if not sep or not method:
            problems.add(f"--setting takes METHOD=V1,V2, e.g. --setting sparsity=0.5,0.9. "
                         f"Got {item!r}.")
            continue
        if problems.check(partial(get_method, method), f"--setting {item}: ") is not None:
            take(method, f"--setting {item}", values)
    for flag, (method, attr) in SHORTCUTS.items():
        values = getattr(args, attr)
        if values is not None:
            take(method, f"{flag} {values}".strip(), values)
    return out


def check_scan_args(args: argparse.Namespace, problems: Problems) -> ScanConfig | None:
    """The scan's configuration from the flags, or None after recording every problem."""
    from sensplan.sensitivity import ScanConfig, get_task
    from sensplan.sensitivity.methods import Setting, get_method

    problems.at_least(args.batch_size, 1, "--batch-size")
    problems.at_least(args.check_samples, 1, "--check-samples")
    problems.at_least(args.fast_measured, 2, "--fast-measured")
    problems.at_least(args.cache_mb, 0, "--cache-mb")
    problems.at_least(args.round_to, 1, "--round-to")
    problems.at_least(args.workers, 1, "--workers")
    task = problems.check(lambda: get_task(args.task))
    names = _method_names(args, problems)
    if names is None:
        return None
    overrides = _overrides(args, names, problems)
    settings: dict[str, list[Setting]] = {}
    transformer = str(getattr(args, "model", "") or "").startswith("hf:")
    for name in names:
        method = get_method(name)
        if name not in overrides:
            defaults = method.transformer_settings if transformer and method.transformer_settings else \
                method.default_settings
            settings[name] = [dict(s) for s in defaults]
            continue
        flag, text = overrides[name]
        try:
            parsed = method.parse_settings(text)
        except (ValueError, TypeError, KeyError, UserInputError) as e:
            problems.add(f"{flag}: {e}")
            continue
        if not parsed:
            example = _values(method.default_settings, method.setting_key)
            form = f"--setting {name}=" if flag.startswith("--setting") else flag.split()[0] + " "
            problems.add(f"{flag}: give at least one value, e.g. {form}{example}.")
            continue
        settings[name] = parsed
    if problems.messages or task is None:
        return None
    units = tuple(u.strip() for u in (args.units or "").split(",") if u.strip())
    return problems.check(lambda: ScanConfig(settings, task=args.task, batch_size=args.batch_size,
                                            check_samples=args.check_samples, fast=args.fast,
                                            fast_measured=args.fast_measured, cache_mb=args.cache_mb,
                                            units=units, round_to=args.round_to))


def _values(settings: Any, key: str) -> str:
    return ",".join(str(s.get(key)) for s in settings)


def scan_outputs(out: Path, flag: str = "--out") -> list[Output]:
    from sensplan._journal import journal_path

    return [Output(out, flag), Output(Path(journal_path(out)), flag)]


def check(args: argparse.Namespace, problems: Problems) -> ScanConfig | None:
    """Every check of the scan's flags that needs no model and no data."""
    check_data_args(args, problems)
    check_runtime_args(args, problems)
    return check_scan_args(args, problems)


# -- running -------------------------------------------------------------------------------------
def execute(args: argparse.Namespace, cfg: ScanConfig, model: Any, spec: ModelSpec, data: EvalSet,
            calib: EvalSet | None, out: Path) -> Scan:
    """Scan and save to ``out``; on Ctrl-C, say what the journal holds and how to resume."""
    import torch

    from sensplan._journal import journal_path
    from sensplan.sensitivity import scan

    journal = Path(journal_path(out))
    dtype = getattr(torch, args.dtype)
    try:
        table = scan(model, data, cfg, calib=calib, model_spec=spec, weights=args.weights,
                     progress=None, journal=journal, resume=not args.no_resume,
                     device=device(args.device), dtype=dtype, workers=args.workers, ray=args.ray)
    except KeyboardInterrupt:
        n = saved_probes(journal)
        say(f"\ninterrupted: {n} finished probe(s) are saved in {journal}. The same command "
            f"resumes from there:\n  {command_line(args.argv, drop=['--no-resume'])}")
        raise Interrupted from None
    table = table.save(out)
    _summarize(table)
    return table


def saved_probes(journal: Path) -> int:
    """Distinct finished probes in a journal (see :mod:`sensplan._journal`: a header line, then
    one ``{"key": ..., "record": ...}`` line per probe); a line cut mid-write is not counted."""
    keys = set()
    try:
        lines = journal.read_bytes().splitlines()[1:]
    except OSError:
        return 0
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("record"), dict):
            keys.add(str(entry.get("key")))
    return len(keys)


def _summarize(table: Scan) -> None:
    prov = table.data["provenance"]
    base = table.baseline
    reused = prov.get("probes_from_journal") or 0
    estimated = prov.get("probes_estimated")
    say(f"scanned {len(table.results)} probes in {prov['seconds']:.1f} s"
        + (f" ({estimated} estimated by --fast, {len(table.results) - estimated} measured)"
           if estimated is not None else "")
        + (f" ({reused} reused from the journal)" if reused else "")
        + f"; baseline {table.metric.name} {base['score']:.4f} on {base['n']} samples")
    cache = prov.get("prefix_cache") or {}
    if cache.get("reason") and cache.get("limit_mb"):
        say(f"  activations are not reused between probes: {cache['reason']}")
    elif cache.get("probes run in full"):
        say(f"  {cache['probes run in full']} probe(s) ran the whole model: what they change could not be "
            f"placed in the traced graph")
    graph = table.data.get("pruning_graph", {})
    if not graph.get("available", True):
        say(f"  {graph.get('reason')}")
    for method, skipped in table.skipped().items():
        for unit, why in list(skipped.items())[:5]:
            say(f"  {method} skipped {unit}: {why}")
        if len(skipped) > 5:
            say(f"  {method} skipped {len(skipped) - 5} more unit(s); the report lists them")
    if not table.results:
        say("WARNING: nothing was measured: every unit was skipped, so no plan can be made from this "
            "scan. Scan other --methods (e.g. --methods prune,weight_quant).")


def main(args: argparse.Namespace) -> int:
    problems = Problems()
    cfg = check(args, problems)
    out = Path(args.out)
    check_file_out(problems, args.out, "scan.json")
    check_outputs(problems, scan_outputs(out))
    problems.raise_if_any()
    set_threads(args)
    model, spec = load_model(args)
    data, calib = load_data(args)
    execute(args, need(cfg), model, spec, data, calib, out)
    print(os.fspath(out))
    return 0
