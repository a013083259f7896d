"""A scan killed with SIGKILL resumes from its journal: no finished probe is redone, and the final
table equals that of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sensplan._errors import ArtifactError
from sensplan.sensitivity import DataSpec, ModelSpec, ScanConfig, load_eval_set, load_model, scan
from tests.conftest import digits_model

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from sensplan.sensitivity import DataSpec, ModelSpec, ScanConfig, load_eval_set, load_model, scan
spec = ModelSpec("sensplan:digits_cnn")
model = load_model(spec, sys.argv[1])
data = load_eval_set(DataSpec.parse("digits:test"), 300, seed=0)
cfg = ScanConfig({"prune": [{"ratio": r} for r in (0.2, 0.4, 0.6)],
                  "weight_quant": [{"bits": b} for b in (8, 6, 4, 3, 2)],
                  "sparsity": [{"ratio": r} for r in (0.5, 0.7, 0.9)]})
table = scan(model, data, cfg, model_spec=spec, progress=False, journal=sys.argv[2] + ".journal")
table.save(sys.argv[2])
print("probes", len(table.results), "reused", table.data["provenance"]["probes_from_journal"])
"""


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(path.read_text())["results"]]


def _run(weights: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, str(weights), str(out)], capture_output=True,
                          text=True, timeout=300, check=True)


@pytest.mark.slow
def test_sigkill_then_resume_redoes_nothing_and_equals_an_uninterrupted_scan(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save(digits_model(width=32).state_dict(), weights)
    full = tmp_path / "full.json"
    _run(weights, full)
    expected = _rows(full)

    out = tmp_path / "killed.json"
    journal = Path(str(out) + ".journal")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(weights), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    lines = 0
    while time.monotonic() < deadline and proc.poll() is None:
        lines = len(journal.read_text().splitlines()) if journal.exists() else 0
        if lines >= 12:  # the header and at least 11 probes
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the scan finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()  # reaps the process and closes its pipes
    assert not out.exists()
    saved = len(journal.read_text().splitlines()) - 1
    assert saved >= 11

    resumed = _run(weights, out)
    reused = int(resumed.stdout.split("reused")[1])
    assert reused >= saved - 1  # a line cut mid-write by the kill is dropped, nothing else
    assert reused < len(expected)
    assert _rows(out) == expected


def test_more_settings_reuse_rows_and_other_data_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save(digits_model(width=32).state_dict(), weights)
    spec = ModelSpec("sensplan:digits_cnn")
    model = load_model(spec, weights)
    data = load_eval_set(DataSpec.parse("digits:test"), 100, seed=0)
    journal = tmp_path / "scan.json.journal"
    first = scan(model, data, ScanConfig({"weight_quant": [{"bits": 8}]}), progress=False,
                 journal=journal)
    more = scan(model, data, ScanConfig({"weight_quant": [{"bits": 8}, {"bits": 4}]}), progress=False,
                journal=journal)
    assert more.data["provenance"]["probes_from_journal"] == len(first.results)
    assert len(more.results) == 2 * len(first.results)
    other = load_eval_set(DataSpec.parse("digits:test"), 100, seed=1)
    with pytest.raises(ArtifactError, match="different"):
        scan(model, other, ScanConfig({"weight_quant": [{"bits": 8}]}), progress=False, journal=journal)
    fresh = scan(model, other, ScanConfig({"weight_quant": [{"bits": 8}]}), progress=False,
                 journal=journal, resume=False)
    assert fresh.data["provenance"]["probes_from_journal"] == 0


def test_a_journal_from_float32_is_not_reused_under_another_dtype(tmp_path):
    model = digits_model()
    data = load_eval_set(DataSpec.parse("digits:test"), 60, seed=0)
    cfg = ScanConfig({"weight_quant": [{"bits": 4}]})
    journal = tmp_path / "scan.json.journal"
    first = scan(model, data, cfg, progress=False, journal=journal)
    again = scan(model, data, cfg, progress=False, journal=journal)  # float32 again: every row reused
    assert again.data["provenance"]["probes_from_journal"] == len(first.results) > 0
    with pytest.raises(ArtifactError, match=r"dtype: was \(absent\), now 'bfloat16'"):
        scan(model, data, cfg, progress=False, journal=journal, dtype=torch.bfloat16)
