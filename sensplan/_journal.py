"""An append-only journal of finished probes, so a long scan killed at any point can resume.

The journal lives beside the scan's output (``scan.json`` -> ``scan.json.journal``). It is a text
file of JSON lines::

    {"format": "sensplan.journal", "schema_version": 1, "header": {...}}   <- what is scanned
    {"key": "[unit,method,setting]", "record": {...}}                      <- one per finished probe

The header line is written atomically (temporary file + rename). Every record is one ``write`` of a
whole line followed by ``flush`` and ``fsync``, so once :meth:`Journal.append` returns the record
survives even SIGKILL. A kill in the middle of a write leaves at most one partial last line; reading
ignores it and the next append cuts it off. Any other damage is reported, never silently skipped.

Only the standard library is used, so the CLI can read a journal without importing torch.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeGuard

from sensplan._errors import ArtifactError

JOURNAL_FORMAT = "sensplan.journal"
JOURNAL_SCHEMA_VERSION = 1

_START_OVER = ("It was written for a different model, weights or data. Delete it, pass another "
               "--out, or run with --no-resume to start over.")


def journal_path(out: str | os.PathLike[str]) -> Path:
    """The journal of the scan written to ``out``: ``out`` + ``.journal``, in the same folder."""
    return Path(os.fspath(out) + ".journal")


class Journal:
    """The finished probes of one scan, keyed by (unit, method, setting); see the module docstring.

    Create one with :meth:`open` (which reads or creates the file). Example::

        with Journal.open(journal_path("scan.json"), header) as jr:
            if jr.get(unit, method, setting) is None:
                jr.append(unit, method, setting, run_probe())
    """

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any]) -> None:
        """Hold the journal at ``path`` for ``header``, empty and unread; :meth:`open` fills it."""
        self.path = Path(path)
        self.header: dict[str, Any] = _normalized(header)
        self._records: dict[str, dict[str, Any]] = {}
        self._file: BinaryIO | None = None
        self._valid_size: int | None = None  # bytes to keep before the first append, if known
        self._needs_newline = False  # the last complete record lacks its "\n"
        #: True when reading dropped a partial last line (a kill mid-write).
        self.dropped_partial_line = False

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], header: dict[str, Any], *,
             resume: bool = True) -> Journal:
        """Read the journal at ``path``, or create it holding only ``header``.

        With ``resume=False``, or when no (or an empty) file exists, any old journal is replaced
        atomically by a fresh one. Raises :class:`ArtifactError` when the existing file is not a
        journal, was written for another ``header``, or has a damaged line before its last one.
        """
        jr = cls(path, header)
        if resume and jr.path.is_file() and jr.path.stat().st_size > 0:
            jr._load()
        else:
            jr._create()
        return jr

    def _create(self) -> None:
        """Write a journal holding only the header line, atomically, with the umask's permissions.

        The temporary file is opened with mode ``"xb"``, so the kernel applies the umask as for any
        file the user creates (``tempfile.mkstemp`` would force 0600).
        """
        line = _line({"format": JOURNAL_FORMAT, "schema_version": JOURNAL_SCHEMA_VERSION,
                      "header": self.header})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "xb") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)
        self._records = {}
        self._valid_size = None
        self._needs_newline = False

    def _load(self) -> None:
        """Read the header and records; remember where a partial last line starts."""
        where = repr(str(self.path))
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # split() yields a final b"" when the file ends with "\n": that is no line at all
        ends_with_newline = lines[-1] == b""
        if ends_with_newline:
            lines.pop()
        first = _parse(lines[0])
        if not (isinstance(first, dict) and first.get("format") == JOURNAL_FORMAT):
            raise ArtifactError(
                f"{where} is not a sensplan scan journal (its first line is not a "
                f"{JOURNAL_FORMAT} header). Delete it, pass another --out, or run with "
                f"--no-resume to start over.")
        version = first.get("schema_version")
        if version != JOURNAL_SCHEMA_VERSION or not isinstance(first.get("header"), dict):
            raise ArtifactError(
                f"The scan journal {where} has schema_version {version!r}, but this sensplan "
                f"reads version {JOURNAL_SCHEMA_VERSION}. Delete it, pass another --out, or run "
                f"with --no-resume to start over.")
        diff = _header_diff(first["header"], self.header)
        if diff:
            raise ArtifactError(f"The scan journal {where} does not match this scan ({diff}). "
                                f"{_START_OVER}")

        offset = len(lines[0]) + 1
        records: dict[str, dict[str, Any]] = {}
        for number, raw in enumerate(lines[1:], start=2):
            last = number == len(lines)
            entry = _parse(raw)
            if not _is_record(entry):
                if last:  # a kill mid-write: drop it, cut it off before the next append
                    self._valid_size = offset
                    self.dropped_partial_line = True
                    break
                raise ArtifactError(
                    f"The scan journal {where} is damaged at line {number} (not a complete "
                    f"record, and not the last line, so it was not cut by a kill). Delete it, or "
                    f"run with --no-resume to start over.")
            records[entry["key"]] = entry["record"]
            offset += len(raw) + 1
        else:
            # a complete last record whose "\n" was not written yet (or the header alone)
            self._needs_newline = not ends_with_newline
        self._records = records

    # -- reading --------------------------------------------------------------------------------
    @staticmethod
    def key(unit: str, method: str, setting: Mapping[str, Any]) -> str:
        """The canonical key of a probe: the same for equal settings in any key order."""
        return json.dumps([unit, method, dict(setting)], sort_keys=True, separators=(",", ":"))

    def get(self, unit: str, method: str, setting: Mapping[str, Any]) -> dict[str, Any] | None:
        """The record of that probe (the latest one, if it was appended twice), or None."""
        rec = self._records.get(self.key(unit, method, setting))
        return None if rec is None else dict(rec)

    def __contains__(self, probe: object) -> bool:
        """``(unit, method, setting) in journal``; a key string from :meth:`key` works too."""
        if isinstance(probe, str):
            return probe in self._records
        if isinstance(probe, tuple) and len(probe) == 3:
            unit, method, setting = probe
            return self.key(unit, method, setting) in self._records
        return False

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        """Every ``(key, record)``, as :meth:`records` orders them (keys as :meth:`key` makes them)."""
        return [(k, dict(r)) for k, r in self._records.items()]

    def records(self) -> list[dict[str, Any]]:
        """Every record, in the order the probes were first appended (latest value per probe)."""
        return [dict(r) for r in self._records.values()]

    def __len__(self) -> int:
        """The number of distinct probes recorded."""
        return len(self._records)

    # -- writing --------------------------------------------------------------------------------
    def append(self, unit: str, method: str, setting: Mapping[str, Any],
               record: dict[str, Any]) -> None:
        """Record a finished probe durably: one whole line, flushed and fsynced before returning."""
        key = self.key(unit, method, setting)
        line = _line({"key": key, "record": record})  # raises before writing if not JSON-able
        f = self._writer()
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
        # keep what a reader of the file would get (tuples become lists, and so on)
        self._records[key] = json.loads(line)["record"]

    def _writer(self) -> BinaryIO:
        """The file, open for appending, with any partial last line cut off first."""
        if self._file is None:
            if not self.path.is_file():  # removed behind our back: start a valid file again
                self._create()
            f = open(self.path, "ab")  # kept open between appends
            try:
                if self._valid_size is not None:
                    f.truncate(self._valid_size)
                    f.flush()
                    os.fsync(f.fileno())
                if self._needs_newline:
                    f.write(b"\n")
            except BaseException:
                f.close()
                raise
            self._valid_size, self._needs_newline = None, False
            self._file = f
        return self._file

    def close(self) -> None:
        """Close the file (if an append opened it); the journal stays on disk."""
        if self._file is not None:
            f, self._file = self._file, None
            f.close()

    def remove(self) -> None:
        """Close the journal and delete its file."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r}, {len(self)} record(s))"


def _line(obj: dict[str, Any]) -> bytes:
    """One journal line. NaN and infinities are kept (Python reads them back) for exact resumes."""
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


def _parse(raw: bytes) -> Any:
    """The JSON value of one line, or None when it is not valid JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_record(entry: Any) -> TypeGuard[dict[str, Any]]:
    return (isinstance(entry, dict) and isinstance(entry.get("key"), str)
            and isinstance(entry.get("record"), dict))


def _normalized(header: dict[str, Any]) -> dict[str, Any]:
    """``header`` as it reads back from JSON, so a fresh header compares equal to a stored one."""
    out: dict[str, Any] = json.loads(json.dumps(header))
    return out


_MISSING = object()


def _header_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which header keys differ, old vs new value (shortened); "" when the headers are equal."""
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        if a != b:
            if isinstance(a, str) and isinstance(b, str) and _short(a) == _short(b):
                i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                cut = "..." if i > 4 else ""  # show where they differ
                a, b = cut + a[max(0, i - 4):i + 12], cut + b[max(0, i - 4):i + 12]
            parts.append(f"{k}: was {_short(a)}, now {_short(b)}")
    return "; ".join(parts)


def _short(value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = text if len(text) <= 16 else text[:13] + "..."
    return repr(text) if isinstance(value, str) else text


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX only; Windows cannot open folders)."""
    if sys.platform == "win32":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
