"""What the verbs share: argument groups, checks that speak in the user's flags, loading helpers.

Nothing here imports torch at module level; the loading helpers import it when they run, so
``sensplan --help`` and the torch-free verbs (plan, validate) start fast.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sensplan._errors import InternalError, UserInputError

if TYPE_CHECKING:
    import torch

    from sensplan.sensitivity import EvalSet, ModelSpec

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_USER_ERROR = 2
EXIT_BUDGET_MISSED = 3
EXIT_INTERRUPTED = 130

T = TypeVar("T")


class Interrupted(Exception):
    """Raised by a verb that has already told the user how to resume; ``main`` exits 130."""


def need(value: T | None) -> T:
    """``value`` after ``Problems.raise_if_any``: a check returns None only with a problem."""
    if value is None:
        raise InternalError("a check returned nothing without reporting a problem")
    return value


# -- output --------------------------------------------------------------------------------------
def flag_given(args: argparse.Namespace, flag: str) -> bool:
    """Whether the command line named ``flag`` (``--samples 5`` or ``--samples=5``), not just left it
    at its default."""
    return any(a == flag or a.startswith(flag + "=") for a in getattr(args, "argv", []))


def say(msg: str) -> None:
    """Progress and summaries go to stderr; stdout carries only the command's result (a path)."""
    print(msg, file=sys.stderr, flush=True)


def command_line(argv: Sequence[str], *, drop: Iterable[str] = ()) -> str:
    """``argv`` as a shell command starting with ``sensplan``, without the flags in ``drop``."""
    skip = set(drop)
    return "sensplan " + shlex.join(a for a in argv if a not in skip)


# -- collecting problems -------------------------------------------------------------------------
class Problems:
    """User mistakes found before any expensive work, reported together as one error."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        if message not in self.messages:
            self.messages.append(message)

    def check(self, fn: Callable[[], T], prefix: str = "") -> T | None:
        """``fn()``, or None after recording its UserInputError (prefixed with ``prefix``)."""
        try:
            return fn()
        except UserInputError as e:
            self.add(f"{prefix}{e}")
            return None

    def at_least(self, value: float | None, low: float, flag: str, *, strict: bool = False,
                 note: str = "") -> None:
        """Record a problem unless ``value`` is None, or >= ``low`` (> ``low`` when ``strict``)."""
        if value is None:
            return
        if value < low or (strict and value == low):
            rel = ">" if strict else ">="
            self.add(f"{flag} must be {rel} {low:g}{note}. Got {value:g}.")

    def raise_if_any(self) -> None:
        if len(self.messages) == 1:
            raise UserInputError(self.messages[0])
        if self.messages:
            raise UserInputError(f"{len(self.messages)} problems:\n  - "
                                 + "\n  - ".join(self.messages))


# -- output paths --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """A path a verb will write: a ``file`` or a directory (``is_dir``), named by ``flag``."""

    path: Path
    flag: str
    is_dir: bool = False


def output_problem(out: Output) -> str | None:
    """Why ``out`` cannot be written, or None. Checks without writing anything."""
    p = Path(os.path.abspath(out.path))
    fix = f"Choose another {out.flag}."
    if out.is_dir and p.exists() and not p.is_dir():
        return f"{out.flag}: {out.path} is an existing file, but a directory goes there. {fix}"
    if not out.is_dir and p.is_dir():
        return f"{out.flag}: {out.path} is an existing directory, but a file goes there. {fix}"
    probe = p if out.is_dir else p.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{out.flag}: cannot create {out.path}: {probe} is a file, not a directory. {fix}"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{out.flag}: cannot write {out.path}: the directory {probe} is not writable. {fix}"
    return None


#: the flags (argparse dests) that name files a verb reads
_INPUT_FLAGS = ("scan", "plan", "weights", "cost_table", "class_map")


def clobber_problem(args: argparse.Namespace) -> str | None:
    """Why ``--out`` would overwrite one of the command's own input files, or None."""
    out = getattr(args, "out", None)
    if not out:
        return None
    inputs: list[tuple[str, str]] = []
    for dest in _INPUT_FLAGS:
        value = getattr(args, dest, None)
        for path in value if isinstance(value, list) else [value] if value else []:
            inputs.append((f"--{dest.replace('_', '-')}", str(path)))
    spec = str(getattr(args, "model", "") or "")
    if spec.startswith("pickle:"):
        inputs.append(("--model", spec[len("pickle:"):]))
    elif spec.rpartition(":")[0].endswith(".py"):
        inputs.append(("--model", spec.rpartition(":")[0]))
    target = os.path.realpath(out)
    for flag, path in inputs:
        if os.path.realpath(path) == target:
            return (f"--out {out} is also the {flag} file: writing there would replace your input. "
                    f"Choose another --out.")
    return None


def check_file_out(problems: Problems, text: str, name: str, flag: str = "--out") -> None:
    """A file output written with a trailing separator names a directory: say so, do not write a file."""
    if text.endswith(("/", os.sep)):
        problems.add(f"{flag} {text} ends with {text[-1]!r}, a directory, but {flag} names a file here "
                     f"(e.g. {text.rstrip('/' + os.sep) or '.'}/{name}).")


def check_outputs(problems: Problems, outputs: Sequence[Output]) -> None:
    """Record the first unwritable output (the later ones usually fail for the same reason)."""
    for out in outputs:
        why = output_problem(out)
        if why:
            problems.add(why)
            return


# -- argparse helpers ----------------------------------------------------------------------------
def add_verb(sub: SubParsers, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A subparser whose ``--help`` ends with ``example``; no prefix matching of flags."""
    p = sub.add_parser(name, help=summary, description=summary,
                       epilog="example:\n" + example.strip("\n"),
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    # SUPPRESS: absent here, the global `sensplan --verbose VERB` value stays in the namespace
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error (also `sensplan --verbose VERB`)")
    return p


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    # more threads than 4 rarely speed up the small batches of a scan, and a shared machine suffers
    return max(1, min(4, available_cores()))


def add_model_args(p: argparse.ArgumentParser, *, recorded: str = "") -> None:
    """The model flags; with ``recorded`` (the artifact that records the model, e.g. "the plan's"),
    --model is optional and defaults to it."""
    g = p.add_argument_group("model" + (f" (default: {recorded})" if recorded else ""))
    g.add_argument("--model", required=not recorded, metavar="SPEC",
                   help="torchvision:NAME | sensplan:NAME | path/file.py:FACTORY | "
                        "package.module:FACTORY | pickle:FILE | hf:DIR or hf:ORG/NAME (a Hugging Face "
                        "save_pretrained folder, or the local hub cache)"
                        + (f"; default {recorded}, with its weights, checked by digest" if recorded else ""))
    g.add_argument("--weights", metavar="FILE",
                   help="checkpoint: a state dict; {'state_dict': ...} nesting and 'module.' "
                        "prefixes are handled (loaded with weights_only=True)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model factory, e.g. num_classes=10 (repeatable)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow --model pickle:FILE (unpickling runs code from the file: trusted "
                        "files only)")


def add_data_args(p: argparse.ArgumentParser, *, recorded: str = "") -> None:
    """The evaluation-data flags; with ``recorded`` (as for :func:`add_model_args`), --data is
    optional and defaults to the data it records."""
    g = p.add_argument_group("evaluation data")
    g.add_argument("--data", required=not recorded, metavar="SPEC",
                   help="DIR or imagefolder:DIR (class subfolders) | cifar10:ROOT[:train|test] | "
                        "digits[:train|test] | text:FILE | jsonl:FILE:FIELD[:LABEL] | "
                        "csv:FILE:FIELD[:LABEL] | datasets:DIR:FIELD[:LABEL] (DIR: a Hugging Face "
                        "datasets save_to_disk folder; text needs --model hf:DIR or --tokenizer)"
                        + (f"; default {recorded} (its sample and calibration, drawn again and checked by "
                           f"digest; its preprocessing, labels and text settings as recorded)" if recorded else ""))
    g.add_argument("--samples", type=int, default=2000, metavar="N",
                   help="size of the stratified, seeded evaluation sample (default 2000; 0 = all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the evaluation sample (default 0)")
    g.add_argument("--class-map", metavar="FILE.json",
                   help="which model output each class folder is: {\"cat\": 3, \"dog\": 5}, or a "
                        "list of class names in output order. Needed when the folders are not "
                        "exactly the model's classes in sorted order (applies to every data flag)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave images that cannot be decoded out (they are counted and reported) "
                        "instead of stopping with an error that names them")
    g.add_argument("--seq-len", type=int, default=0, metavar="N",
                   help="text: tokens per window (text:FILE) or the most tokens per record (jsonl, "
                        "csv, datasets); default min(128, the model's limit)")
    g.add_argument("--tokenizer", metavar="DIR",
                   help="text: the folder of a Hugging Face tokenizer (default: --model hf:DIR's)")
    g.add_argument("--resize", type=int, metavar="PX", help="resize the shorter image side to PX")
    g.add_argument("--crop", type=int, metavar="PX", help="center-crop to PX x PX")
    g.add_argument("--mean", metavar="M1,M2,M3",
                   help="normalisation mean (default ImageNet's; digits 0.5)")
    g.add_argument("--std", metavar="S1,S2,S3",
                   help="normalisation std (default ImageNet's; digits 0.5)")
    c = p.add_argument_group("BatchNorm recalibration")
    c.add_argument("--calib-data", metavar="SPEC",
                   help="data for BatchNorm recalibration (default: --train-data if given, else "
                        "samples of --data outside the evaluation sample)")
    c.add_argument("--calib-samples", type=int, default=500, metavar="N",
                   help="calibration samples (default 500)")
    c.add_argument("--no-bn-recalibration", action="store_true",
                   help="do not recalibrate BatchNorm statistics after compressing")


def add_runtime_args(p: argparse.ArgumentParser, *, dtype: bool) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu | cuda | cuda:N | mps (default cpu)")
    if dtype:
        g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="evaluate in this precision; 16-bit runs under autocast "
                            "(default float32)")
    g.add_argument("--threads", type=int, metavar="N",
                   help=f"CPU threads for torch (default: min(4, available cores) = "
                        f"{default_threads()} here)")


# -- checks --------------------------------------------------------------------------------------
def check_data_args(args: argparse.Namespace, problems: Problems) -> None:
    """Checks of the evaluation-data flags that need no data."""
    problems.at_least(args.samples, 0, "--samples", note=" (0 = all)")
    problems.at_least(args.calib_samples, 0, "--calib-samples", strict=True)
    problems.at_least(args.seed, 0, "--seed")
    problems.at_least(getattr(args, "seq_len", 0), 0, "--seq-len", note=" (0 = the default)")
    if args.class_map is not None:
        problems.check(partial(class_map, args))
    before = len(problems.messages)
    problems.at_least(args.resize, 1, "--resize")
    problems.at_least(args.crop, 1, "--crop")
    problems.check(partial(floats, args.mean, "--mean"))
    problems.check(partial(floats, args.std, "--std"))
    if len(problems.messages) > before:
        return  # the data specs below need valid preprocessing flags
    if problems.check(partial(preprocess, args)) is None:
        return
    for flag, text in (("--data", args.data), ("--calib-data", args.calib_data)):
        if text:
            problems.check(partial(data_spec, text, args, flag))


_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def check_runtime_args(args: argparse.Namespace, problems: Problems) -> None:
    problems.at_least(args.threads, 1, "--threads")
    problems.check(lambda: device(args.device))


def device(text: str) -> torch.device:
    """``--device`` as a torch device, refused when this machine does not have it."""
    if not _DEVICE.match(text):
        raise UserInputError(f"--device takes cpu, cuda, cuda:N or mps. Got {text!r}.")
    import torch

    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {text}: CUDA is not available here "
                                 f"(torch.cuda.is_available() is False). Use --device cpu.")
        n = torch.cuda.device_count()
        index = int(text.partition(":")[2] or 0)
        if index >= n:
            raise UserInputError(f"--device {text}: this machine has {n} CUDA device(s), "
                                 f"cuda:0 to cuda:{n - 1}.")
    if text == "mps" and not torch.backends.mps.is_available():
        raise UserInputError("--device mps: MPS is not available here. Use --device cpu.")
    return torch.device(text)


def set_threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads or default_threads())


def floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserInputError(f"{flag} takes comma-separated numbers such as 0.5,0.5,0.5. "
                             f"Got {text!r}.") from None


def check_budget_scale(scan: Any, budgets: Sequence[Any], cost_tables: Sequence[Any] = (),
                       signal: str = "auto") -> None:
    """Raise a BudgetError for a budget such as ``macs=2`` (an absolute 2 MACs, far below the
    original model's cost: a fraction was meant), and an ArtifactError for a planning ``signal``
    the scan did not record, before any solving or measuring."""
    from sensplan.planner import Costs

    original = Costs(scan, list(cost_tables), signal).original
    for b in budgets:
        if b.metric in original:
            b.limit(original)


# -- loading -------------------------------------------------------------------------------------
def model_spec(args: argparse.Namespace) -> ModelSpec:
    from sensplan.sensitivity import ModelSpec

    kwargs = {}
    for item in args.model_arg:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserInputError(f"--model-arg takes KEY=VALUE, e.g. num_classes=10. Got {item!r}.")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return ModelSpec(args.model, kwargs)


def load_model(args: argparse.Namespace) -> tuple[Any, ModelSpec]:
    """The model (on the CPU, eval mode) and its spec."""
    from sensplan.sensitivity import load_model as _load

    spec = model_spec(args)
    model = _load(spec, args.weights, allow_pickle=args.allow_pickle)
    if args.weights is None and not spec.source.startswith(("pickle:", "hf:")):  # after: a failure stays one line
        say("WARNING: no --weights: the model has RANDOMLY INITIALISED weights. Its drops, plan and "
            "results say nothing about a trained model. The initialisation is seeded (0), so scan, plan "
            "and apply see the same random model, but another torch version or a factory that draws "
            "its own random numbers may build a different one. Pass --weights FILE for real results."
            + (" `sensplan demo --out DIR` trains this model on digits and writes DIR/digits_cnn.pt."
               if spec.source == "sensplan:digits_cnn" else ""))
    return model, spec


class PlanAsScan:
    """What ``model_from_scan`` reads of a scan (``data``, ``path``), from a plan's copy of it: the
    model's record and the scan's sample."""

    def __init__(self, plan: Any) -> None:
        rec = plan.data.get("scan") or {}
        self.data = {"model": plan.data.get("model") or {}, "data": rec.get("sample") or {}}
        self.path = plan.path


def preprocess(args: argparse.Namespace) -> Any:
    from sensplan.sensitivity import Preprocess

    mean, std = floats(args.mean, "--mean"), floats(args.std, "--std")
    if (mean is None) != (std is None):
        raise UserInputError("Give both --mean and --std (e.g. --mean 0.5,0.5,0.5 --std "
                             "0.25,0.25,0.25), or neither for the defaults.")
    if mean is not None and std is not None:
        if len(mean) != len(std):
            raise UserInputError(f"--mean has {len(mean)} value(s) but --std has {len(std)}; give "
                                 f"one of each per input channel.")
        if any(v <= 0 for v in std):
            raise UserInputError(f"Every --std value must be > 0. Got {args.std}.")
        if any(v > 1 for v in (*mean, *std)):  # images load as values in [0, 1]
            raise UserInputError(f"--mean {args.mean} --std {args.std} look like the 0-255 scale, but images "
                                 f"load as values in [0, 1]: divide them by 255 (ImageNet's are --mean "
                                 f"0.485,0.456,0.406 --std 0.229,0.224,0.225).")
    return Preprocess(resize=args.resize, crop=args.crop, mean=mean, std=std)


def class_map(args: argparse.Namespace) -> tuple[tuple[str, int], ...] | None:
    """``--class-map`` read and checked (None without the flag)."""
    from sensplan.sensitivity import load_class_map

    return load_class_map(args.class_map) if getattr(args, "class_map", None) else None


def data_spec(text: str, args: argparse.Namespace, flag: str) -> Any:
    """The data spec of ``flag`` with the preprocessing, class map and skip flags applied."""
    import dataclasses

    from sensplan.sensitivity import DataSpec

    recorded = getattr(args, "recorded_data", None)  # apply without --data: read as the scan read its data
    try:
        spec = DataSpec.parse(text, recorded.preprocess if recorded is not None else preprocess(args))
    except UserInputError as e:
        raise UserInputError(f"{flag}: {e}") from None
    if recorded is not None:
        spec = dataclasses.replace(spec, class_map=recorded.class_map, skip_unreadable=recorded.skip_unreadable)
        if spec.is_text:
            return dataclasses.replace(spec, tokenizer=recorded.tokenizer, seq_len=recorded.seq_len)
        return spec
    spec = dataclasses.replace(spec, class_map=class_map(args),
                               skip_unreadable=bool(getattr(args, "skip_bad_images", False)))
    if spec.is_text:
        model = str(getattr(args, "model", "") or getattr(args, "recorded_model", "") or "")
        tok = getattr(args, "tokenizer", None) or (model[3:] if model.startswith("hf:") else "")
        if not tok:
            raise UserInputError(f"{flag} {text}: text data needs a tokenizer. Use a Hugging Face model "
                                 f"(--model hf:DIR, whose folder holds its tokenizer) or give "
                                 f"--tokenizer DIR.")
        if os.path.isdir(tok):  # recorded absolute: plan and apply read the data from elsewhere too
            tok = os.path.realpath(tok)
        seq_len = int(getattr(args, "seq_len", 0) or 0)
        if model.startswith("hf:"):
            from sensplan.sensitivity import model_max_positions

            limit = model_max_positions(model[3:])
            if limit is not None and seq_len > limit:
                raise UserInputError(f"--seq-len {seq_len} is longer than the model takes ({limit} positions). "
                                     f"Give --seq-len {limit} or less.")
            seq_len = seq_len or min(128, limit or 128)
        spec = dataclasses.replace(spec, tokenizer=tok, seq_len=seq_len)
    return spec


def report_skipped(desc: dict[str, Any], flag: str) -> None:
    """Say how many unreadable images ``--skip-bad-images`` left out of a data set."""
    n = desc.get("unreadable_skipped")
    if n:
        examples = "; ".join(desc.get("unreadable", [])[:3])
        say(f"--skip-bad-images: left out {n} unreadable image(s) of {flag} "
            f"({desc.get('spec')}), e.g. {examples}")


def load_data(args: argparse.Namespace) -> tuple[EvalSet, EvalSet | None]:
    """The evaluation sample, and the calibration data (None with --no-bn-recalibration)."""
    from sensplan.sensitivity import load_calibration_set, load_eval_set

    data = load_eval_set(data_spec(args.data, args, "--data"), args.samples or None, args.seed)
    report_skipped(data.description, "--data")
    available = data.description.get("n_available")
    if flag_given(args, "--samples") and args.samples and available is not None and args.samples > int(available):
        say(f"--samples {args.samples}: --data has {available} items; all of them are used.")
    if args.no_bn_recalibration:
        return data, None
    flag = "--calib-data" if args.calib_data else "--train-data"
    source = args.calib_data or getattr(args, "train_data", None)
    calib = load_calibration_set(data, args.calib_samples, args.seed,
                                 data_spec(source, args, flag) if source else None)
    if "itself" not in str(calib.description.get("role", "")):  # else it is the sample above
        report_skipped(calib.description, flag if source else "--data (calibration)")
    return data, calib
