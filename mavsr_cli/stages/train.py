"""Stage `train`: cached features + transcripts -> a Matryoshka checkpoint.

    reads  dump/<encoders-tag>/train/ (features), data/train/manifest.jsonl (transcripts)
    writes exp/<tag>/{config.yaml, cmd.txt, meta.json, train.log, metrics.jsonl, ckpt/step-NNNNNN/, .done}
What the experiment trains (rate grid, strategy, modality, models, feature dims) is recorded once,
in every checkpoint's meta; meta.json, written when training finishes, is that meta plus the
checkpoint to decode (checkpoint.trained_grid reads either).
`--rates all` trains every configuration of the config's grid together (one checkpoint decodes
at each); `--rates a16v5` trains a single-configuration baseline with the same code. A rerun of a
finished experiment is skipped; an interrupted one resumes from its last checkpoint, exactly.
Under `torchrun --nproc_per_node N mavsr train ...` the same command runs N DDP processes; only
rank 0 writes files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import __version__
from ..config import Config
from ..config import load as load_config
from ..errors import MavsrError
from ..features import FeatureStore, cache_split, encoders_tag, provenance
from ..fsutil import atomic_write_text
from ..model.build import build_model, train_bf16
from ..rates import select
from ..recipe import Recipe, checksum_or_none, finished, is_done, mark_done, resolve_model, write_provenance
from ..train_loop import device_type, train


class Logger:
    def __init__(self, path: Path, echo) -> None:
        self.f = open(path, "a", encoding="utf-8")
        self.echo = echo

    def __call__(self, msg: str) -> None:
        self.f.write(msg + "\n")
        self.f.flush()
        self.echo(msg)


def default_tag(config_path: str | None, strategy: str, rates_spec: str, modality: str | None = None) -> str:
    stem = Path(config_path).stem if config_path else "default"
    mod = f"_{modality}" if modality else ""
    return f"{stem}{mod}_{strategy}_{'all' if rates_spec == 'all' else rates_spec.replace(',', '-')}"


def _inputs(recipe: Recipe, cfg: Config, rates: list, cache: Path) -> dict:
    """What a finished experiment was trained from: its config (the decode defaults aside: they do
    not change the weights), the rates, and checksums of the transcripts and the feature cache."""
    import yaml

    settings = {k: v for k, v in yaml.safe_load(cfg.dump()).items() if k != "decode"}
    return {"config": settings, "rates": ",".join(r.tag for r in rates),
            "manifest": checksum_or_none(recipe.manifest("train")),
            "features": checksum_or_none(cache / "provenance.json")}


def _validation(recipe: Recipe, cfg: Config, enc_tag: str) -> tuple[FeatureStore, dict[str, str]] | None:
    """The validation split's features and transcripts, when the recipe prepared one (train.val_split);
    a prepared split without features is refused in one line rather than trained without."""
    split = cfg.train.val_split
    if not split or not recipe.manifest(split).is_file():
        return None
    cache = recipe.dump(enc_tag, cache_split(cfg, split))
    if not is_done(cache):
        raise MavsrError(f"data/{split} is prepared but has no features in {cache.relative_to(recipe.root)}: run "
                         f"`mavsr extract-features --split {split}` (or set train.val_split: '' to train without)")
    return FeatureStore(cache), {u.id: u.text for u in recipe.utterances(split)}


def run(recipe: Recipe, cfg: Config, rates_spec: str, tag: str, force: bool = False, log=print) -> Path:
    if not tag or tag in (".", "..") or "/" in tag or os.sep in tag:
        raise MavsrError(f"--tag {tag!r} must be a plain name: the experiment goes to exp/<tag>/")
    grid = cfg.model.rate_grid()
    rates = select(rates_spec, grid)
    exp = recipe.exp(tag)
    main = int(os.environ.get("RANK", "0")) == 0
    enc_tag = encoders_tag(provenance(recipe, cfg))
    cache = recipe.dump(enc_tag, cache_split(cfg, "train"))
    inputs = _inputs(recipe, cfg, rates, cache)
    redo = ("use --force to train it again from the start (a finished run is not extended: the learning-rate "
            "schedule spans all its epochs), or another --tag")
    if not force and finished(exp, inputs, f"train: {exp.relative_to(recipe.root)}", log, redo):
        return exp
    val = _validation(recipe, cfg, enc_tag)  # checked before anything is written
    if main:
        if force and exp.exists():
            import shutil

            shutil.rmtree(exp)
        exp.mkdir(parents=True, exist_ok=True)
        old_cfg = exp / "config.yaml"  # compared as loaded: a run started by an earlier release resumes
        if old_cfg.is_file() and load_config(old_cfg).dump() != cfg.dump():
            raise MavsrError(f"{exp} was started with another config; use --force to start over or another --tag")
        write_provenance(exp, cfg.dump())
    logger = Logger(exp / "train.log", log) if main else (lambda msg: None)
    store = FeatureStore(cache)
    texts = {u.id: u.text for u in recipe.utterances("train")}
    missing = [i for i in store.ids() if i not in texts]
    if missing:
        raise MavsrError(f"feature cache has utterances not in data/train/manifest.jsonl: {missing[:3]}")
    dims = store.provenance["dims"]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, dims.get("audio"), dims.get("video"), seed=cfg.train.seed,
                        llm_path=resolve_model(recipe, cfg.model.llm), rates=rates,
                        bf16=train_bf16(cfg.train, device_type(cfg.train.device)))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger(f"train: {tag}: {len(store.ids())} utterances, rates {','.join(r.tag for r in rates)}, "
           f"strategy {cfg.model.lora.strategy}, {n_train:,} trained of {n_all:,} parameters (frozen in "
           f"{str(model.frozen_dtype).removeprefix('torch.')})")
    meta = {
        "mavsr_version": __version__,
        "rates": [r.tag for r in rates],
        "strategy": cfg.model.lora.strategy,
        "modality": cfg.model.modality,
        "llm": cfg.model.llm,
        "audio_encoder": cfg.audio_encoder.path if dims.get("audio") else None,
        "video_encoder": cfg.video_encoder.path if dims.get("video") else None,
        "dims": dims,
        "encoders_tag": enc_tag,
        "trained_parameters": n_train,
    }
    ckpt = train(model, store, texts, cfg, rates, exp, meta, logger, val)
    if not main:
        return exp
    atomic_write_text(exp / "meta.json", json.dumps({**meta, "checkpoint": ckpt.name}, indent=2) + "\n")
    mark_done(exp, inputs)
    logger(f"train: done, checkpoint {ckpt.relative_to(recipe.root)}")
    return exp
