"""Files that are never half-written: atomic writes and directories, checksums, stale temporaries.

Every output is written to a temporary sibling (`.<name>.tmp-<pid>`) and renamed into place, so a
reader, a killed run or a full disk never leaves a part behind; `clean_stale` removes what killed
runs left. No mavsr imports beyond errors: manifest, media and recipe all build on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from .errors import MavsrError

DONE = ".done"  # the marker a finished output dir carries (written last)


@contextlib.contextmanager
def atomic_file(path: Path, keep_suffix: bool = False):
    """Yield a temporary sibling of `path` to write; it replaces `path` when the block succeeds and
    is removed when it fails (disk full, interrupted), so readers never see a part. `keep_suffix`
    keeps the extension last (`.x.tmp-<pid>.mp4`) for writers that go by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = f".{path.stem}.tmp-{os.getpid()}{path.suffix}" if keep_suffix else f".{path.name}.tmp-{os.getpid()}"
    tmp = path.with_name(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never a part."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_pickle(path: Path, obj) -> None:
    """Pickle `obj` (protocol 2, as the LRS landmark pickles) so readers never see a part."""
    import pickle

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=2)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def staged_dir(final: Path, marker: str = ""):
    """Yield a temporary directory that becomes `final` (with `.done`, holding `marker`) when the
    block succeeds.

    An existing unfinished `final` (no `.done`) is replaced; a finished one must be forced away by
    the caller's check first. On failure the temporary directory is removed and `final` untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / DONE).write_text(marker)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(d: Path) -> None:
    """Fail in one line, before any work, when `d` cannot take new files (read-only, full, no
    permission): a probe file is created, written, synced and removed in `d`, or in its nearest
    existing parent when `d` is not there yet (nothing is created)."""
    d = Path(d)
    while not d.exists() and d.parent != d:
        d = d.parent
    probe = d / f".mavsr-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise MavsrError(f"cannot write to {d}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: Path, expected: str | None, what: str) -> None:
    """One-line refusal when a file's content is not what was written (truncated, bit rot, replaced)."""
    if expected is None:
        return
    try:
        got = sha256_file(path)
    except OSError as e:
        raise MavsrError(f"{what} {path}: unreadable ({e.strerror or e})") from None
    if got != expected:
        raise MavsrError(f"{what} {path} is corrupt: its checksum does not match the one written with it "
                         f"(sha256 {got[:12]}... vs {expected[:12]}...); re-create it")


def inside(path: Path, root: Path) -> bool:
    """Whether `path` lies under `root` once `..` parts are resolved (symlinks are not followed:
    a corpus linked into the recipe dir stays inside it)."""
    p, r = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root))
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


_TMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(?:\.[A-Za-z0-9]+)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(d: Path, recursive: bool = False) -> int:
    """Remove the temporary files and dirs (`.<name>.tmp-<pid>`) that killed runs left in `d`.

    Only those of processes no longer running on this machine are touched, so concurrent shard
    workers keep theirs. Returns how many were removed."""
    d = Path(d)
    if not d.is_dir():
        return 0
    n = 0
    for p in (d.rglob(".*") if recursive else d.glob(".*")):
        m = _TMP_NAME.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n
