"""The ``sensplan`` command line: one small module per verb; each parses flags, calls the library.

Verbs: scan | profile | plan | frontier | apply | export | report | run | demo | validate | methods |
models. Exit codes:

- 0: done;
- 1: a bug in sensplan (the traceback is shown; please report it);
- 2: a user mistake: one message naming the fix (``--verbose`` adds the traceback);
- 3: ``apply``/``run`` wrote their files, but the measured model missed a budget;
- 130: interrupted (Ctrl-C); a scan says how to resume from its journal;
- 141: the reader of the output went away (``sensplan methods | head``): the rest is dropped
  quietly, as a command killed by SIGPIPE would.

This package imports no torch: each verb imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from sensplan._errors import SensplanError, UserInputError
from sensplan._version import __version__
from sensplan.cli import (
    apply,
    demo,
    export,
    frontier,
    methods,
    models,
    plan,
    profile,
    report,
    run,
    scan,
    validate,
)
from sensplan.cli._common import EXIT_INTERRUPTED, EXIT_USER_ERROR, Interrupted, clobber_problem

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE

VERBS = (scan, profile, plan, frontier, apply, export, report, run, demo, validate, methods, models)

EPILOG = """\
example (a typical session):
  sensplan scan --model sensplan:digits_cnn --weights w.pt --data digits --out scan.json
  sensplan plan --scan scan.json --budget macs=0.5 --out plan.json
  sensplan apply --model sensplan:digits_cnn --weights w.pt --data digits --plan plan.json \\
      --out result/
  sensplan report --scan scan.json --plan plan.json --result result/ --out report/
  sensplan run ... --budget macs=0.5 --out runs/r1      # all four at once
  sensplan frontier --scan scan.json --metric size --out frontier/   # drop against cost, 8 budgets
  sensplan export --plan plan.json --to onnxruntime --out ort.json  # for another tool (--list)
  sensplan demo                                         # offline, about 30 s
"""


_ARGV: list[str] = []  # the command line being parsed, for the error hint


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) that points at ``--help``."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        flag = message.split(":")[0].replace("argument ", "").split("/")[-1].strip()
        following = _ARGV[_ARGV.index(flag) + 1:_ARGV.index(flag) + 2] if flag in _ARGV else []
        if "expected one argument" in message and following and following[0].startswith("-"):
            hint = f" (a value that starts with '-' is written {flag}=VALUE)"  # e.g. --std -1,1,1
        prog = self.prog
        verb = next((a for a in _ARGV if not a.startswith("-")), "")
        if prog == "sensplan" and verb and message.startswith("unrecognized arguments"):
            prog = f"sensplan {verb}"  # argparse reports a verb's stray flags at the top level
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}{hint}. See `{prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sensplan", allow_abbrev=False, epilog=EPILOG,
        description="Measure which layers of a PyTorch model can take how much compression, plan "
                    "the best allocation for a budget, apply it, and report.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sensplan {__version__}")
    parser.add_argument("--verbose", action="store_true", default=False,
                        help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in VERBS:
        verb.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _ARGV[:] = argv
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a flag argparse refused (one line, printed)
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    if not getattr(args, "fn", None):
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    args.argv = argv  # to print the command that resumes an interrupted scan
    try:
        clobber = clobber_problem(args)
        if clobber:
            raise UserInputError(clobber)
        code = int(args.fn(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe (a data-loading worker): a real error, shown with its traceback
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except Interrupted:
        return EXIT_INTERRUPTED
    except UserInputError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"sensplan {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        resume = (" Run the same command again: the scan resumes from its journal, redoing no "
                  "finished probe." if args.command in ("scan", "run", "demo") else "")
        print(f"\nsensplan {args.command}: interrupted; the files already written are complete "
              f"(every file is written atomically).{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SensplanError as e:
        traceback.print_exc()
        print(f"sensplan {args.command}: internal error: {e}. Please report it with the traceback "
              f"above.", file=sys.stderr)
        return 1


def _stdout_closed() -> bool:
    """Whether standard output's reader went away: a write there fails too. (The write of one
    newline to a live stdout happens only on the way to showing another pipe's error.)"""
    try:
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _drop_stdout() -> None:
    """Point standard output at /dev/null so the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured output)
        pass


__all__ = ["build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
