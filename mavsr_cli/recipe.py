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

import json
import shlex
import sys
from pathlib import Path

from .errors import MavsrError
from .fsutil import DONE, atomic_write_text, inside


def is_done(d: Path) -> bool:
    return (d / DONE).is_file()


def mark_done(d: Path, inputs: dict | None = None) -> None:
    """Mark `d` finished; `inputs` (what it was made from: options, checkpoint, input checksums)
    is the marker's content, so a rerun can tell whether it asks for the same thing."""
    atomic_write_text(d / DONE, done_text(inputs))


def done_text(inputs: dict | None) -> str:
    return "" if inputs is None else json.dumps(inputs, indent=2, sort_keys=True, default=str) + "\n"


def done_inputs(d: Path) -> dict | None:
    """What a finished dir was made from; {} for a marker that recorded nothing (mavsr 0.1.0),
    None when `d` is not finished."""
    f = d / DONE
    if not f.is_file():
        return None
    text = f.read_text(encoding="utf-8", errors="replace").strip()
    try:
        got = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return got if isinstance(got, dict) else {}


def _flat(d: dict, head: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{head}{k}."))
        else:
            out[f"{head}{k}"] = v
    return out


def input_changes(old: dict, new: dict) -> list[str]:
    """`key old != new` for every recorded input that differs (keys one side lacks are not compared:
    a marker of an earlier release recorded fewer; nor are inputs not known now, None)."""
    a, b = _flat(json.loads(json.dumps(old, default=str))), _flat(json.loads(json.dumps(new, default=str)))
    return [f"{k} {_short(a[k])} != {_short(b[k])}" for k in sorted(a.keys() & b.keys())
            if a[k] != b[k] and b[k] is not None]  # None: not known now (e.g. a cache since removed)


def _short(v) -> str:
    s = str(v)
    return s[:12] + "..." if len(s) > 24 and all(c in "0123456789abcdef" for c in s) else s


def finished(d: Path, inputs: dict, what: str, log=print, redo: str = "use --force to redo it") -> bool:
    """True (logged) when `d` is finished and was made from `inputs`; False when not finished.
    A dir finished from other inputs is refused in one line naming each difference (and `redo`, how
    to go on): silently keeping it would report results of something else, silently redoing it
    would lose work."""
    old = done_inputs(d)
    if old is None:
        return False
    changes = input_changes(old, inputs)
    if changes:
        raise MavsrError(f"{what} was made from other inputs: {'; '.join(changes)}; {redo}")
    log(f"{what} is done (use --force to redo)")
    return True


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

    def prepared_splits(self) -> list[str]:
        """The splits `prepare` finished (data/<split>/ with a manifest and .done), by name."""
        d = self.root / "data"
        return sorted(p.name for p in d.glob("*/") if is_done(p) and (p / "manifest.jsonl").is_file()) \
            if d.is_dir() else []

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


def checksum_or_none(path: Path) -> str | None:
    """A cheap input checksum for a done-marker: the file's sha256, None when it is not there."""
    from .fsutil import sha256_file

    return sha256_file(path) if Path(path).is_file() else None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """exp/<tag>/ckpt/step-*/ holding their trained tensors, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if (p / "model.safetensors").is_file())


def decoding_checkpoint(exp: Path) -> Path | None:
    """The checkpoint decode reads: the one a finished experiment names in meta.json (e.g. an
    average, or the best on val), else the latest; None before the first."""
    meta = exp / "meta.json"
    if meta.is_file():
        name = json.loads(meta.read_text()).get("checkpoint")
        if name and (exp / "ckpt" / name / "model.safetensors").is_file():
            return exp / "ckpt" / name
    ckpts = list_checkpoints(exp / "ckpt")
    return ckpts[-1] if ckpts else None


def other_checkpoint(d: Path, now: Path | None) -> str | None:
    """The checkpoint decode dir `d` was decoded from, where that is not `now` (decoding_checkpoint
    of its experiment: a decode of a training still running, say); None where it is, or where
    either is not known."""
    made = (done_inputs(d) or {}).get("checkpoint")
    return made if made and now is not None and made != now.name else None


def status_lines(recipe: Recipe) -> list[str]:
    """What the recipe dir holds, a line per output dir: finished (done) or not (`mavsr info`)."""
    def state(d: Path) -> str:
        return "done" if is_done(d) else "unfinished"

    def rel(d: Path) -> str:
        return str(d.relative_to(recipe.root))

    lines = [f"recipe {recipe.root}:"]
    for d in sorted((recipe.root / "data").glob("*/")):
        n = sum(1 for _ in open(d / "manifest.jsonl")) if (d / "manifest.jsonl").is_file() else 0
        lines.append(f"  {rel(d)}: {state(d)}, {n} utterances")
    if (recipe.root / "models").is_dir():
        lines.append(f"  models: {state(recipe.root / 'models')}")
    for d in sorted((recipe.root / "dump").glob("*/*/")):
        lines.append(f"  {rel(d)}: {state(d)}")
    for d in sorted((recipe.root / "exp").glob("*/")):
        ckpts = sorted((d / "ckpt").glob("step-*"))
        last = f", last checkpoint {ckpts[-1].name}" if ckpts else ""
        chosen = decoding_checkpoint(d)
        if ckpts and chosen and chosen.name != ckpts[-1].name:
            last += f" (decode uses {chosen.name})"
        decodes = [x for x in d.glob("decode_*/*/") if is_done(x)]
        lines.append(f"  {rel(d)}: {'trained' if is_done(d) else 'training unfinished'}{last}, "
                     f"{len(decodes)} finished decode dirs")
    if len(lines) == 1:
        lines.append("  nothing yet: start with `mavsr prepare`")
    return lines
