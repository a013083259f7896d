"""``sensplan profile``: measure a latency cost table for a scan's options on a runtime.

The table is what ``plan --cost-table`` reads: plan against ``--budget latency=0.6`` (a fraction of
the original's latency) or ``latency=3ms``. See ``sensplan.planner._profile`` for how it is timed.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sensplan.cli._common import (
    Output,
    Problems,
    add_verb,
    check_file_out,
    check_outputs,
    need,
    say,
    set_threads,
)

if TYPE_CHECKING:
    from sensplan.cli._common import SubParsers

EXAMPLE = """\
  sensplan profile --scan scan.json --runtime onnxruntime --batch 64 --threads 1 --out latency.json
  sensplan plan --scan scan.json --cost-table latency.json --budget latency=0.6 --runtime onnxruntime \\
      --out plan.json
"""


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "profile", "Measure a latency cost table for a scan's options (each channel group's "
                                 "widths, each layer's int8 form) on a runtime.", EXAMPLE)
    p.add_argument("--scan", required=True, metavar="FILE", help="scan.json from `sensplan scan`")
    p.add_argument("--runtime", default="onnxruntime", metavar="NAME",
                   help="torch | onnxruntime (needs the ort extra) (default onnxruntime)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="the batch size timed (default 1)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for the runtime (default: min(4, available cores))")
    p.add_argument("--weights", metavar="FILE",
                   help="the scan's checkpoint, if it moved (checked against the scan's digest)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a pickle:FILE model spec (trusted files only)")
    p.add_argument("--out", default="latency.json", metavar="FILE",
                   help="where to write the table (default latency.json)")
    p.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
    from sensplan._tables import Scan
    from sensplan.planner import check_runtime

    problems = Problems()
    scan = problems.check(partial(Scan.load, args.scan))
    problems.check(partial(check_runtime, args.runtime))
    problems.at_least(args.batch, 1, "--batch")
    problems.at_least(args.threads, 1, "--threads")
    check_file_out(problems, args.out, "latency.json")
    check_outputs(problems, [Output(Path(args.out), "--out")])
    problems.raise_if_any()
    set_threads(args)
    import torch

    from sensplan._artifacts import write_json
    from sensplan.planner import model_from_scan, profile
    from sensplan.sensitivity import DataSpec, load_eval_set

    s = need(scan)
    model, _ = model_from_scan(s, weights=args.weights, allow_pickle=args.allow_pickle,
                               purpose="Profiling", fix="profile where the scan ran",
                               in_python="sensplan.planner._profile.profile(model, example, scan, ...)")
    example = load_eval_set(DataSpec.from_record(dict(s.data["data"])), 1, 0).x[:1]
    threads = torch.get_num_threads()
    say(f"timing {args.runtime} at batch {args.batch} on {threads} thread(s) ...")
    table = profile(model, example, s, runtime=args.runtime, batch=args.batch, threads=threads, progress=say)
    write_json(args.out, table)
    info = table["profile"]
    say(f"whole model {info['model_ms']:.3f} ms, its weighted layers {info['layers_ms']:.3f} ms, overhead "
        f"{table['overhead']:.3f} ms; {info['operators_timed']} operator shapes timed in {info['seconds']:.0f} s")
    cal = info.get("calibration") or {}
    failed = [h["failed"] for h in cal.get("how", []) if "failed" in h]
    say(f"calibrated against the whole model: scale {cal.get('scale', 1.0):.3f}, int8 factor "
        f"{cal.get('int8_factor', 1.0):.3f}" + (f"; calibration failed: {'; '.join(failed)}" if failed else ""))
    if info.get("warning"):
        say(f"warning: the timings are unreliable: {info['warning']}")
    for layer, why in list(info["not_profiled"].items())[:5]:
        say(f"  not timed: {layer} ({why}); its time is in the overhead")
    if info.get("unpriced"):
        first, why = next(iter(info["unpriced"].items()))
        say(f"note: {len(info['unpriced'])} option(s) priced at the float time (e.g. {first}): {why}")
    print(os.fspath(args.out))
    return 0
