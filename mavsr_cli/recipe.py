"""The recipe directory: canonical paths, `.done` markers, atomic writes, provenance files.

Layout (design.md, Data flow):
    data/<split>/manifest.jsonl
    dump/<encoders-tag>/<split>/{index.jsonl, shard-*.safetensors}
    exp/<tag>/{config.yaml, cmd.txt, train.log, ckpt/step-NNNNNN/}
    exp/<tag>/decode_<rates>_<opts>/<split>/{hyp.jsonl, wer.json, result.txt}
Every stage writes into a temporary sibling and renames it into place at the end, then marks it
with `.done`; a rerun skips finished work unless forced.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from .errors import MavsrError

DONE = ".done"


def is_done(d: Path) -> bool:
    return (d / DONE).is_file()


def mark_done(d: Path) -> None:
    atomic_write_text(d / DONE, "")


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


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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


@contextlib.contextmanager
def staged_dir(final: Path, force: bool = False):
    """Yield a temporary directory that becomes `final` (with `.done`) when the block succeeds.

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
        (tmp / DONE).write_text("")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def command_line() -> str:
    """The command that is running, quoted so it can be pasted back into a shell."""
    prog = Path(sys.argv[0]).name
    if prog in ("__main__.py", "-c") or prog.endswith(".py"):
        prog = "mavsr"
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]]) + "\n"


def write_provenance(d: Path, config_yaml: str | None) -> None:
    """Every output dir explains itself: the resolved config and the exact command."""
    if config_yaml is not None:
        atomic_write_text(d / "config.yaml", config_yaml)
    atomic_write_text(d / "cmd.txt", command_line())


class Recipe:
    """Canonical paths inside one recipe directory."""

    def __init__(self, root: str | Path = ".") -> None:
        self.root = Path(root).resolve()

    def data(self, split: str) -> Path:
        return self.root / "data" / split

    def manifest(self, split: str) -> Path:
        return self.data(split) / "manifest.jsonl"

    def dump(self, enc_tag: str, split: str) -> Path:
        return self.root / "dump" / enc_tag / split

    def exp(self, tag: str) -> Path:
        return self.root / "exp" / tag

    def require_manifest(self, split: str) -> Path:
        p = self.manifest(split)
        if not p.is_file():
            raise MavsrError(f"no manifest for split {split!r} at {p}: run `mavsr prepare` first")
        return p

    def resolve_media(self, p: str) -> Path:
        """Manifest media paths are absolute or relative to the recipe dir (one rule)."""
        path = Path(p)
        return path if path.is_absolute() else self.root / path

    def media_roots(self, split: str) -> list[Path]:
        """Where a split's media may lie: the recipe dir, and the data root `prepare` recorded for
        it (data/<split>/config.yaml, `data_root`) when the manifest points at media in place."""
        import yaml

        roots = [self.root]
        cfg = self.data(split) / "config.yaml"
        if cfg.is_file():
            try:
                settings = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise MavsrError(f"{cfg}: unreadable ({e})") from None
            if isinstance(settings, dict) and settings.get("data_root"):
                roots.append(Path(settings["data_root"]))
        return roots

    def utterances(self, split: str) -> list:
        """The split's manifest records; a media path that escapes the roots the split was prepared
        from (`..` out of the recipe dir, or an absolute path elsewhere) is refused in one line."""
        from . import manifest as mf

        path = self.require_manifest(split)
        utts = mf.read(path)
        roots = self.media_roots(split)
        for u in utts:
            for m in (u.video, u.audio):
                if m and not any(inside(self.resolve_media(m), r) for r in roots):
                    raise MavsrError(f"{path}: {u.id}: media path {m!r} escapes the roots this split was "
                                     f"prepared from ({', '.join(str(r) for r in roots)})")
        return utts


def resolve_model(recipe: Recipe, name_or_path: str) -> str:
    """A model reference in a config: a path relative to the recipe dir if one exists, else as given
    (an absolute path or a hub id)."""
    p = recipe.root / name_or_path
    return str(p) if not Path(name_or_path).is_absolute() and p.exists() else name_or_path
