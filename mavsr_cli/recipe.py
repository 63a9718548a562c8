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


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def staged_dir(final: Path, force: bool = False):
    """Yield a temporary directory that becomes `final` (with `.done`) when the block succeeds.

    An existing unfinished `final` (no `.done`) is replaced; a finished one must be forced away by
    the caller's check first. On failure the temporary directory is removed and `final` untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
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


def resolve_model(recipe: Recipe, name_or_path: str) -> str:
    """A model reference in a config: a path relative to the recipe dir if one exists, else as given
    (an absolute path or a hub id)."""
    p = recipe.root / name_or_path
    return str(p) if not Path(name_or_path).is_absolute() and p.exists() else name_or_path
