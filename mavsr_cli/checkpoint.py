"""Self-describing checkpoints: only what was trained, plus what is needed to use it.

exp/<tag>/ckpt/step-NNNNNN/
    model.safetensors   trained tensors (projectors, LoRA, modality markers); metadata "meta"
    trainer.pt          optimizer + scheduler + epoch, for resuming (weights_only load)
    checksums.json      sha256 of both, verified whenever they are loaded
meta: mavsr version, rate grid (tags), LoRA strategy, modality, LLM and encoder references,
feature dims and cache tag, step/epoch. The resolved config lies in exp/<tag>/config.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import MavsrError
from .fsutil import atomic_write_json, clean_stale, sha256_file, verify_checksum
from .rates import Rates
from .recipe import decoding_checkpoint, list_checkpoints


def save(ckpt_root: Path, step: int, state: dict, meta: dict, trainer: dict | None, keep: int,
         best: int = 0) -> Path:
    """Write ckpt/step-NNNNNN atomically; keep the last `keep` step checkpoints (to resume from) and
    the `best` of lowest validation loss (to decode or average)."""
    final = save_named(ckpt_root, f"step-{step:06d}", state, meta, trainer)
    if keep > 0:
        kept = set(list_checkpoints(ckpt_root)[-keep:]) | set(by_val_loss(ckpt_root)[:best])
        for old in list_checkpoints(ckpt_root):
            if old not in kept:
                shutil.rmtree(old)
    return final


def by_val_loss(ckpt_root: Path) -> list[Path]:
    """The step checkpoints that carry a validation loss (those of an epoch's end), lowest first
    (the later one first on a tie)."""
    scored = [(read_meta(c).get("val_loss"), c) for c in list_checkpoints(ckpt_root)]
    return [c for v, c in sorted(((v, c) for v, c in scored if v is not None), key=lambda x: (x[0], -_step(x[1])))]


def _step(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def selected(ckpt_root: Path, select: str, n: int) -> list[Path]:
    """The checkpoints the final model is made from: the `n` of lowest validation loss (`best`,
    when checkpoints carry one), else the last `n`; in step order."""
    best = by_val_loss(ckpt_root)[:n] if select == "best" else []
    return sorted(best, key=_step) if best else list_checkpoints(ckpt_root)[-n:]


def save_named(ckpt_root: Path, name: str, state: dict, meta: dict, trainer: dict | None = None) -> Path:
    final = ckpt_root / name
    clean_stale(ckpt_root)
    tmp = ckpt_root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"meta": json.dumps(meta, sort_keys=True)})
        if trainer is not None:
            torch.save(trainer, tmp / "trainer.pt")
        sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        atomic_write_json(tmp / "checksums.json", sums)
    except BaseException:  # disk full, interrupted: the checkpoints before this one are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def for_decoding(exp_dir: Path) -> Path:
    """The checkpoint a finished experiment names in meta.json (e.g. an average), else the latest
    (recipe.decoding_checkpoint, which `info` and `score` read without torch)."""
    ckpt = decoding_checkpoint(exp_dir)
    return ckpt if ckpt is not None else latest(exp_dir)


def latest(exp_dir: Path) -> Path:
    ckpts = list_checkpoints(exp_dir / "ckpt")
    if not ckpts:
        raise MavsrError(f"no checkpoint in {exp_dir}/ckpt: train first (`mavsr train`)")
    return ckpts[-1]


_verified: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime) last verified by this process


def verify(ckpt: Path, name: str = "model.safetensors") -> None:
    """Check one file of a checkpoint against checksums.json (checkpoints written before checksums
    existed have none and are only checked for readability). A file is hashed once per process
    unless it changes (reading the meta and then the weights does not hash it twice)."""
    sums_file = ckpt / "checksums.json"
    f = ckpt / name
    if not f.is_file():
        raise MavsrError(f"checkpoint {ckpt} has no {name}")
    st = f.stat()
    if _verified.get(f) == (st.st_size, st.st_mtime_ns):
        return
    if sums_file.is_file():
        try:
            sums = json.loads(sums_file.read_text())
        except (ValueError, OSError) as e:
            raise MavsrError(f"checkpoint {ckpt}: unreadable checksums.json ({e})") from None
        verify_checksum(f, sums.get(name), "checkpoint file")
        _verified[f] = (st.st_size, st.st_mtime_ns)


def read_meta(ckpt: Path) -> dict:
    verify(ckpt)
    try:
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            return json.loads(f.metadata()["meta"])
    except Exception as e:
        raise MavsrError(f"unreadable checkpoint {ckpt}: {e}") from None


def load_state(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    verify(ckpt)
    try:
        return load_file(str(ckpt / "model.safetensors"))
    except Exception as e:
        raise MavsrError(f"unreadable checkpoint {ckpt}: {e}") from None


def load_trainer(ckpt: Path) -> dict:
    """The optimizer/scheduler state of a step checkpoint, checksum-verified, tensors only."""
    verify(ckpt, "trainer.pt")
    try:
        return torch.load(ckpt / "trainer.pt", weights_only=True, map_location="cpu")
    except Exception as e:
        raise MavsrError(f"unreadable trainer state in {ckpt} ({type(e).__name__}); remove that checkpoint "
                         "to resume from the one before it") from None


def grid_of(meta: dict) -> list[Rates]:
    """The rate configurations a checkpoint was trained on (its meta's `rates`)."""
    return [Rates.parse(t) for t in meta["rates"]]


def trained_grid(exp_dir: Path) -> list[Rates]:
    """The rate configurations an experiment trains, from its checkpoints' meta: exp/<tag>/meta.json
    (a finished run's, with the checkpoint to decode), else its latest checkpoint's."""
    meta = exp_dir / "meta.json"
    if meta.is_file():
        return grid_of(json.loads(meta.read_text()))
    return grid_of(read_meta(for_decoding(exp_dir)))
