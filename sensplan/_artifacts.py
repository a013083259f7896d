"""Plain-file artifacts: atomic writes, versioned JSON, digests and provenance.

Every JSON artifact is an object with ``format`` (e.g. ``"sensplan.scan"``) and ``schema_version``
(an integer). Readers accept only the formats and versions they know and say so loudly otherwise.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sensplan._errors import ArtifactError
from sensplan._version import __version__


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Any], object]) -> None:
    """Call ``writer(binary_file)`` on a temporary file beside ``path``, then rename it into place.

    If ``writer`` raises (or the process dies), ``path`` is left untouched and the temporary file
    is removed (or left as a hidden ``.NAME.*.tmp``). The file gets the permissions of the user's
    umask, as any file the user creates: the temporary file is opened with mode ``"xb"``
    (``tempfile.mkstemp`` would force 0600).
    """
    target = Path(os.path.realpath(path))  # through a symlink: the file it points to is replaced
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: store them as null so other tools can parse the file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], obj: dict[str, Any]) -> str:
    """Atomically write ``obj`` as JSON; return the sha256 of the bytes written."""
    data = dumps(obj).encode()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_json(path: str | os.PathLike[str], fmt: str, versions: tuple[int, ...]) -> dict[str, Any]:
    """Read a JSON artifact of format ``fmt`` whose schema_version is one of ``versions``."""
    p = Path(path)
    what = fmt.split(".")[-1]
    verb = {"scan": "sensplan scan", "plan": "sensplan plan", "metrics": "sensplan apply",
            "cost_table": "sensplan profile --scan SCAN"}.get(what)  # a latency table; others by hand
    made_by = f"`{verb}`" + (" (another measured metric: see docs/formats.md)" if what == "cost_table" else "") \
        if verb else "the tool that measures it (see docs/formats.md)"
    if not p.is_file():
        raise ArtifactError(f"The {what} file {str(p)!r} does not exist. Check the path, or create it "
                            f"with {made_by}.")
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{str(p)!r} is not valid JSON ({e}). Was it written by sensplan?") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ArtifactError(f"{str(p)!r} is not a {fmt} file (its format is {got!r}). "
                            f"Pass the file written by {made_by}.")
    v = obj.get("schema_version")
    if isinstance(v, int) and not isinstance(v, bool) and versions and v > max(versions):
        raise ArtifactError(
            f"{str(p)!r} has {fmt} schema_version {v}: a newer sensplan wrote it, and this sensplan "
            f"{__version__} reads up to version {max(versions)}. Upgrade sensplan (pip install -U sensplan), "
            f"or re-create the file with this one ({made_by}).")
    if v not in versions:
        raise ArtifactError(
            f"{str(p)!r} has {fmt} schema_version {v!r}, but this sensplan {__version__} reads "
            f"version(s) {', '.join(map(str, versions))}. Re-create it with this sensplan, or "
            f"install the sensplan version that wrote it.")
    return obj


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_record(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """What an artifact records of a weights file: the path as given, the resolved absolute path
    and the sha256 (all None without a file). :func:`locate` finds it again from anywhere."""
    if not path:
        return {"weights": None, "weights_resolved": None, "weights_sha256": None}
    return {"weights": str(path), "weights_resolved": os.path.realpath(path), "weights_sha256": file_sha256(path)}


def locate(recorded: str, *, resolved: str | None = None, sha256: str | None = None,
           beside: str | os.PathLike[str] | None = None) -> Path | None:
    """Find a file an artifact recorded, from any working directory: first beside the artifact
    (``beside``: its folder; the recorded relative path, then the file name alone), then at the
    resolved absolute path it was recorded with, then the path as recorded (from here). With
    ``sha256`` only a file with that digest counts. None when it is nowhere."""
    candidates: list[Path] = []
    rec = Path(recorded)
    if beside is not None:
        base = Path(beside)
        if not rec.is_absolute():
            candidates.append(base / rec)
        candidates.append(base / rec.name)
    if resolved:
        candidates.append(Path(resolved))
    candidates.append(rec)
    seen: set[str] = set()
    for c in candidates:
        key = os.path.realpath(c)
        if key in seen or not c.is_file():
            continue
        seen.add(key)
        if sha256 is None or file_sha256(c) == sha256:
            return c
    return None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def versions() -> dict[str, str]:
    """Versions of everything that changes results, recorded in every artifact."""
    out = {"sensplan": __version__, "python": platform.python_version()}
    for mod in ("torch", "torchvision", "torch_pruning", "numpy", "scipy"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except ImportError:  # pragma: no cover - all are dependencies
            out[mod] = "missing"
    return out
