"""The recipe directory: canonical paths, `.done` markers, provenance files (writes: fsutil.py).

Layout (design.md, Data flow):
    data/<split>/manifest.jsonl
    dump/<encoders-tag>/<split>/{index.jsonl, shard-*.safetensors}
    exp/<tag>/{config.yaml, cmd.txt, train.log, metrics.jsonl, meta.json, ckpt/step-NNNNNN/}
    exp/<tag>/<DecodeTag.name>/<split>/{hyp.jsonl, wer.json, result.txt}
Every stage writes into a temporary sibling and renames it into place at the end, then marks it
with `.done`; a rerun skips finished work unless forced.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .errors import MavsrError
from .fsutil import DONE, atomic_write_text, inside


def is_done(d: Path) -> bool:
    return (d / DONE).is_file()


def mark_done(d: Path) -> None:
    atomic_write_text(d / DONE, "")


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
