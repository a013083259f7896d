"""The scan journal: records survive reopening and SIGKILL, a cut last line is repaired, and any
other damage or a journal of another scan is refused with a clear message."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sensplan._errors import ArtifactError
from sensplan._journal import JOURNAL_FORMAT, Journal, journal_path

HEADER: dict[str, Any] = {"architecture_digest": "a" * 64, "weights_sha256": "b" * 64,
                          "data_digest": "digits:test|123|100", "calibration_digest": None,
                          "task": "classification"}


def _fill(jr: Journal, n: int) -> None:
    for i in range(n):
        jr.append(f"layer{i}", "weight_quant", {"bits": 8 - i}, {"drop": i / 10, "i": i})


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_journal_path_is_beside_the_output(tmp_path: Path) -> None:
    assert journal_path(tmp_path / "scan.json") == tmp_path / "scan.json.journal"
    assert journal_path("out/scan.json") == Path("out/scan.json.journal")


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "scan.json.journal"
    with Journal.open(path, HEADER) as jr:
        assert len(jr) == 0
        _fill(jr, 3)
    first = json.loads(_lines(path)[0])
    assert first == {"format": JOURNAL_FORMAT, "schema_version": 1, "header": HEADER}

    jr = Journal.open(path, dict(HEADER))
    assert len(jr) == 3
    for i in range(3):
        assert jr.get(f"layer{i}", "weight_quant", {"bits": 8 - i}) == {"drop": i / 10, "i": i}
        assert (f"layer{i}", "weight_quant", {"bits": 8 - i}) in jr
    assert jr.get("layer0", "weight_quant", {"bits": 4}) is None
    assert ("layer0", "prune", {"bits": 8}) not in jr
    assert [r["i"] for r in jr.records()] == [0, 1, 2]
    jr.close()


def test_key_ignores_setting_order_and_later_duplicates_win(tmp_path: Path) -> None:
    assert Journal.key("u", "m", {"a": 1, "b": 2}) == Journal.key("u", "m", {"b": 2, "a": 1})
    assert Journal.key("u", "m", {"a": 1}) == '["u","m",{"a":1}]'
    path = tmp_path / "j"
    with Journal.open(path, HEADER) as jr:
        jr.append("u", "m", {"a": 1, "b": 2}, {"v": 1})
        jr.append("w", "m", {}, {"v": 2})
        jr.append("u", "m", {"b": 2, "a": 1}, {"v": 3})
        assert jr.get("u", "m", {"a": 1, "b": 2}) == {"v": 3}
    reread = Journal.open(path, HEADER)
    assert len(reread) == 2
    assert reread.records() == [{"v": 3}, {"v": 2}]


def test_values_round_trip_exactly(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal.open(path, HEADER) as jr:
        jr.append("u", "m", {"r": 0.1}, {"nan": float("nan"), "inf": float("inf"), "t": (1, 2),
                                         "x": 1 / 3, "s": "é"})
        live = jr.get("u", "m", {"r": 0.1})
    reread = Journal.open(path, HEADER).get("u", "m", {"r": 0.1})
    for rec in (live, reread):
        assert rec is not None
        assert math.isnan(rec["nan"]) and rec["inf"] == math.inf
        assert rec["t"] == [1, 2] and rec["x"] == 1 / 3 and rec["s"] == "é"


def test_header_mismatch_names_the_differing_keys(tmp_path: Path) -> None:
    path = tmp_path / "scan.json.journal"
    with Journal.open(path, HEADER) as jr:
        _fill(jr, 2)
    other = {**HEADER, "weights_sha256": "c" * 64, "task": "agreement"}
    with pytest.raises(ArtifactError) as err:
        Journal.open(path, other)
    msg = str(err.value)
    assert "weights_sha256" in msg and "task" in msg
    assert "data_digest" not in msg and "architecture_digest" not in msg
    assert "'bbbbbbbbbbbbb...'" in msg and "'ccccccccccccc...'" in msg  # shortened to 16 chars
    assert "'classification'" in msg and "'agreement'" in msg
    assert "different model, weights or data" in msg and "--no-resume" in msg
    assert str(path) in msg
    assert len(_lines(path)) == 3  # the refused journal is untouched


def test_header_key_added_or_removed_is_a_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "j"
    Journal.open(path, HEADER).close()
    with pytest.raises(ArtifactError, match=r"batch_size: was \(absent\), now 64"):
        Journal.open(path, {**HEADER, "batch_size": 64})


def test_resume_false_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal.open(path, HEADER) as jr:
        _fill(jr, 3)
    other = {**HEADER, "data_digest": "other"}
    with Journal.open(path, other, resume=False) as jr:
        assert len(jr) == 0
    assert len(_lines(path)) == 1
    assert len(Journal.open(path, other)) == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "j"]  # no temporary file left


def test_missing_folder_and_empty_file_are_created(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "j"
    Journal.open(path, HEADER).close()
    assert json.loads(_lines(path)[0])["header"] == HEADER
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    Journal.open(empty, HEADER).close()
    assert len(_lines(empty)) == 1


def test_truncated_last_line_is_ignored_and_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal.open(path, HEADER) as jr:
        _fill(jr, 3)
    whole = path.read_bytes()
    partial = _lines(path)[-1][:-7]
    path.write_bytes(whole + partial.encode())  # a kill in the middle of the 4th write

    jr = Journal.open(path, HEADER)
    assert len(jr) == 3 and jr.dropped_partial_line
    assert path.read_bytes() == whole + partial.encode()  # reading alone changes nothing
    jr.append("new", "prune", {"ratio": 0.5}, {"drop": 0.25})
    jr.close()

    lines = _lines(path)
    assert len(lines) == 5
    assert all(json.loads(line) for line in lines)
    reread = Journal.open(path, HEADER)
    assert not reread.dropped_partial_line
    assert [r["drop"] for r in reread.records()] == [0.0, 0.1, 0.2, 0.25]


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal.open(path, HEADER) as jr:
        _fill(jr, 2)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with Journal.open(path, HEADER) as jr:
        assert len(jr) == 2
        jr.append("new", "m", {}, {"drop": 1.0})
    assert len(_lines(path)) == 4
    assert len(Journal.open(path, HEADER)) == 3


def test_corrupt_middle_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal.open(path, HEADER) as jr:
        _fill(jr, 4)
    lines = _lines(path)
    lines[2] = lines[2][:10]  # line 3 of the file: the header is line 1
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ArtifactError, match=r"line 3\b") as err:
        Journal.open(path, HEADER)
    assert str(path) in str(err.value)


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scan.json"
    path.write_text(json.dumps({"format": "sensplan.scan", "schema_version": 1}) + "\n")
    with pytest.raises(ArtifactError, match="not a sensplan scan journal"):
        Journal.open(path, HEADER)
    path.write_text(json.dumps({"format": JOURNAL_FORMAT, "schema_version": 99, "header": {}}))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        Journal.open(path, HEADER)


def test_remove_closes_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "j"
    jr = Journal.open(path, HEADER)
    _fill(jr, 1)
    jr.remove()
    assert not path.exists()
    jr.remove()  # twice is fine


def test_a_record_that_is_not_json_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal.open(path, HEADER) as jr:
        with pytest.raises(TypeError):
            jr.append("u", "m", {}, {"x": object()})
        assert len(jr) == 0
    assert len(_lines(path)) == 1


CHILD = """
import sys
from sensplan._journal import Journal
jr = Journal.open(sys.argv[1], {"task": "kill-test"})
i = 0
while True:
    jr.append(f"unit{i}", "weight_quant", {"bits": 8}, {"i": i, "pad": "x" * (i % 4096)})
    print(i, flush=True)
    i += 1
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_keeps_every_appended_record(tmp_path: Path) -> None:
    path = tmp_path / "scan.json.journal"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen = [proc.stdout.readline() for _ in range(5)]
        assert seen == [f"{i}\n" for i in range(5)], proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -9

    jr = Journal.open(path, {"task": "kill-test"})
    records = jr.records()
    assert len(records) >= 5
    assert [r["i"] for r in records] == list(range(len(records)))
    assert all(r["pad"] == "x" * (r["i"] % 4096) for r in records)
    jr.append("after", "m", {}, {"i": -1})  # appending after the kill leaves a valid journal
    jr.close()
    assert len(Journal.open(path, {"task": "kill-test"})) == len(records) + 1


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_file_mode_follows_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        path = tmp_path / "j"
        with Journal.open(path, HEADER) as jr:
            _fill(jr, 1)
        assert path.stat().st_mode & 0o777 == mode
        Journal.open(path, HEADER, resume=False).close()  # the atomic replacement too
        assert path.stat().st_mode & 0o777 == mode
    finally:
        os.umask(old)


def test_header_mismatch_shows_where_two_long_values_with_the_same_start_differ(tmp_path: Path) -> None:
    path = tmp_path / "scan.json.journal"
    with Journal.open(path, {**HEADER, "data": "digits:test|7f3a9c|n=100|none"}) as jr:
        _fill(jr, 1)
    with pytest.raises(ArtifactError) as err:
        Journal.open(path, {**HEADER, "data": "digits:test|7f3a9c|n=200|none"})
    msg = str(err.value)
    assert "'...c|n=100|none'" in msg and "'...c|n=200|none'" in msg, msg
