"""Stage `import`: a checkpoint trained by the authors' code -> a mavsr experiment dir.

    reads  CKPT (model_avg_N.pth or a Lightning epoch=K.ckpt of Omni-AVSR's Llama-AVSR/Llama-MTSK
           code or of the Llama-AVSR repository; layout: authors.py), the LLM and Whisper named on
           the command line (checked against the checkpoint's copies), the AV-HuBERT checkpoint it
           was trained from (optional: its hyper-parameters)
    writes exp/<tag>/{config.yaml, cmd.txt, meta.json, video_encoder.pt, ckpt/imported/, .done}
The experiment decodes with `mavsr decode` and `mavsr transcribe` as any trained one does, after
`mavsr extract-features --config exp/<tag>/config.yaml` for a split. Its config follows the
authors' code (their projectors, LoRA scale, rates, prompt; the waveform normalised before
Whisper; beam 15 and 32 new tokens) and decodes deterministically. A refusal writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from .. import __version__, authors, checkpoint
from .. import config as config_mod
from ..config import Config
from ..errors import MavsrError
from ..features import encoders_tag, provenance
from ..fsutil import atomic_write_text, sha256_file
from ..model import llm as llm_mod
from ..model.audio_encoder import WhisperAudioEncoder
from ..model.avhubert import UNUSED_PREFIXES, AVHubertConfig, AVHubertVideoEncoder
from ..model.build import build_model
from ..recipe import Recipe, mark_done, resolve_model, write_provenance
from ..safe_pickle import load_checkpoint

CHECKPOINT = "imported"  # exp/<tag>/ckpt/imported/


@dataclasses.dataclass(frozen=True)
class Sources:
    """What the command line names beside the checkpoint."""

    llm: str  # hub id or dir of the LLM it was trained on
    audio_encoder: str | None  # hub id or dir of its Whisper (audio models)
    video_encoder: str | None  # the AV-HuBERT .pt it was trained from (video models; optional)


def run(recipe: Recipe, flavour: str, ckpt: Path, exp: Path, src: Sources, hints: authors.Hints,
        force: bool = False, log=print) -> Path:
    exp = exp if exp.is_absolute() else recipe.root / exp
    if exp.exists() and not force:
        raise MavsrError(f"{exp} exists; use --force to replace it or another --exp")
    if exp.exists() and (exp.resolve() == recipe.root.resolve() or not (exp / "config.yaml").is_file()):
        raise MavsrError(f"{exp} is not an experiment dir (no config.yaml); --force replaces experiments only")
    state, hp = authors.read(ckpt)
    layout = authors.describe(state, hp, flavour, hints)
    if "a" in layout.modality and not src.audio_encoder:
        raise MavsrError("the checkpoint has audio projectors: give --audio-encoder (the Whisper it was trained with)")
    cfg = _config(recipe, exp, layout, src)
    log(f"import: {ckpt.name}: {flavour}, modality {layout.modality}, rates "
        f"{','.join(r.tag for r in cfg.model.rate_grid())}, {layout.compression} pooling, LoRA rank "
        f"{layout.lora_rank} scale {layout.lora_scale:g}, projector LayerNorm {'on' if layout.layernorm else 'off'}")
    llm, tok = llm_mod.load(resolve_model(recipe, src.llm))
    vocab = llm.get_input_embeddings().weight.shape[0]
    authors.check_frozen(state, "llm.", llm.state_dict(), f"--llm {src.llm}", vocab)
    dims = {"audio": _audio_dim(recipe, state, cfg, src) if "a" in layout.modality else None}
    video = _video_encoder(recipe, state, src) if "v" in layout.modality else None
    dims["video"] = video.dim if video is not None else None
    model = build_model(cfg, dims["audio"], dims["video"], llm=(llm, tok), rates=cfg.model.rate_grid())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trained = authors.trained_state(state, layout, names, vocab)
    model.load_trainable(trained)  # every name and shape, as `mavsr decode` will load them
    _write(recipe, exp, cfg, trained, dims, video, ckpt, flavour, force)
    log(f"import: wrote {exp}: {sum(t.numel() for t in trained.values()):,} trained parameters")
    return exp


def _config(recipe: Recipe, exp: Path, layout: authors.Layout, src: Sources) -> Config:
    """The experiment's config: the authors' settings, as mavsr names them."""
    rel = exp.relative_to(recipe.root) if exp.is_relative_to(recipe.root) else exp
    lora = {"strategy": "ms", "rank": layout.lora_rank, "alpha": layout.lora_scale * layout.lora_rank,
            "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    model = {"llm": src.llm, "modality": layout.modality, "compression": layout.compression,
             "projector_hidden": layout.hidden, "projector_layernorm": layout.layernorm,
             "prompt": layout.prompt, "lora": lora}
    model.update({k: list(v) for k, v in (("audio_rates", layout.audio_rates), ("video_rates", layout.video_rates))
                  if v})
    data = {"model": model, "decode": {"beam": layout.beam, "max_new_tokens": layout.max_new_tokens},
            "augment": {"noisy_copies": 0}, "train": {"val_split": ""}}
    if src.audio_encoder:
        data["audio_encoder"] = {"path": src.audio_encoder, "mode": "faithful", "normalize": True,
                                 "fit_video": layout.modality == "av"}
    if "v" in layout.modality:
        data["video_encoder"] = {"path": str(rel / "video_encoder.pt")}
    cfg = config_mod.from_dict(data)
    config_mod.validate(cfg)
    return cfg


def _audio_dim(recipe: Recipe, state: dict, cfg: Config, src: Sources) -> int:
    enc = WhisperAudioEncoder.from_config(resolve_model(recipe, src.audio_encoder), cfg.audio_encoder)
    authors.check_frozen(state, "audio_encoder.", enc.encoder.state_dict(), f"--audio-encoder {src.audio_encoder}")
    return enc.dim


def _video_encoder(recipe: Recipe, state: dict, src: Sources) -> AVHubertVideoEncoder:
    """The AV-HuBERT as the checkpoint holds it (its BatchNorm statistics and any LoRA are its own)."""
    tensors = authors.video_encoder_state(state)
    given = None
    if src.video_encoder:
        ckpt = load_checkpoint(resolve_model(recipe, src.video_encoder))
        given = ckpt.get("cfg", {}).get("model") if isinstance(ckpt.get("cfg"), dict) else ckpt.get("args")
        if given is None:
            raise MavsrError(f"{src.video_encoder}: neither 'cfg' nor 'args' describes the model")
    hp = AVHubertConfig.from_checkpoint_cfg(authors.avhubert_config(tensors, given))
    enc = AVHubertVideoEncoder(hp)
    own = {k: v for k, v in tensors.items() if not k.startswith(UNUSED_PREFIXES)}
    missing, unexpected = enc.load_state_dict(own, strict=False)
    if missing or unexpected:
        first = f"missing video_encoder.{missing[0]}" if missing else f"unexpected video_encoder.{unexpected[0]}"
        raise MavsrError(f"the checkpoint's AV-HuBERT does not match its config ({hp.encoder_layers} layers): {first}")
    return enc.eval()


def _write(recipe: Recipe, exp: Path, cfg: Config, trained: dict, dims: dict, video, ckpt: Path, flavour: str,
           force: bool) -> None:
    """Everything, or nothing: the experiment is written beside its place and moved there whole, so a
    failure leaves no half-written dir and (with --force) the experiment it was to replace intact."""
    tmp = exp.parent / f".{exp.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        prov = provenance(recipe, cfg) if video is None else None
        if video is not None:
            torch.save({"model": video.state_dict(), "cfg": {"model": dataclasses.asdict(video.cfg)}},
                       tmp / "video_encoder.pt")
            prov = _provenance_at(recipe, cfg, tmp / "video_encoder.pt")
        source = {"flavour": flavour, "file": str(ckpt.resolve()), "sha256": sha256_file(ckpt)}
        meta = {"mavsr_version": __version__, "rates": [r.tag for r in cfg.model.rate_grid()], "strategy": "ms",
                "modality": cfg.model.modality, "llm": cfg.model.llm,
                "audio_encoder": cfg.audio_encoder.path if dims["audio"] else None,
                "video_encoder": cfg.video_encoder.path if dims["video"] else None, "dims": dims,
                "encoders_tag": encoders_tag(prov),
                "trained_parameters": sum(t.numel() for t in trained.values()), "imported_from": source}
        checkpoint.save_named(tmp / "ckpt", CHECKPOINT, trained, meta)
        write_provenance(tmp, cfg.dump())
        atomic_write_text(tmp / "meta.json", json.dumps({**meta, "checkpoint": CHECKPOINT}, indent=2) + "\n")
        mark_done(tmp, {"imported_from": source})
        if force and exp.exists():
            shutil.rmtree(exp)
        os.replace(tmp, exp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _provenance_at(recipe: Recipe, cfg: Config, written: Path) -> dict:
    """What extract-features will record of these encoders once the AV-HuBERT lies at its place:
    the provenance of the file as written, under the path the config names."""
    placed = dataclasses.replace(cfg, video_encoder=dataclasses.replace(cfg.video_encoder, path=str(written)))
    prov = provenance(recipe, placed)
    prov["video"]["path"] = cfg.video_encoder.path
    return prov
