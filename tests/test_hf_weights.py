"""A hf: model's weights are its folder's files: plan and apply check them against the scan's digest."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from sensplan.cli import main  # noqa: E402
from tests import hf_tiny  # noqa: E402


def test_a_changed_hf_folder_is_refused_by_plan_and_apply_and_an_unchanged_one_is_checked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = hf_tiny.save("gpt2", tmp_path / "gpt2")
    text = tmp_path / "corpus.txt"
    text.write_text(hf_tiny.corpus())
    data = ["--model", f"hf:{model}", "--data", f"text:{text}", "--seq-len", "16"]
    assert main(["scan", *data, "--task", "perplexity", "--samples", "16", "--calib-samples", "8",
                 "--methods", "weight_quant", "--bits", "8,4g32", "--units", "*.h.1.mlp.*",
                 "--out", str(tmp_path / "scan.json")]) == 0
    plan = ["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "bits=28", "--holdout-samples", "100"]
    capsys.readouterr()
    assert main([*plan, "--out", str(tmp_path / "plan.json")]) == 0
    assert "randomly initialised" not in capsys.readouterr().err  # the folder's weights: checked, equal

    hf_tiny.save("gpt2", model, seed=1)  # the folder's files change after the scan
    assert main([*plan, "--out", str(tmp_path / "p2.json")]) == 2
    err = capsys.readouterr().err
    assert f"but 'hf:{model}' now builds others" in err and "its files changed since the scan" in err
    assert not (tmp_path / "p2.json").exists()
    assert main(["apply", *data, "--plan", str(tmp_path / "plan.json"), "--samples", "16", "--no-timing",
                 "--out", str(tmp_path / "result")]) == 2
    err = capsys.readouterr().err
    assert f"(the files of hf:{model} now)" in err and "Restore the folder's files" in err
    assert "randomly initialised" not in err and "--weights" not in err

    # a scan that recorded no digest of the folder (made before digests were kept): the folder's
    # weights are loaded and said to be unchecked, never called random
    import json

    rec = json.loads((tmp_path / "scan.json").read_text())
    del rec["model"]["weights_digest"]
    (tmp_path / "old-scan.json").write_text(json.dumps(rec))
    assert main(["plan", "--scan", str(tmp_path / "old-scan.json"), "--budget", "bits=28", "--holdout-samples",
                 "100", "--out", str(tmp_path / "p3.json")]) == 0
    err = capsys.readouterr().err
    assert "recorded no digest" in err and "not checked" in err and "randomly initialised" not in err
