"""Stage `extract-features`: manifests -> native-rate encoder features (see features.py).

    reads  data/<split>/manifest.jsonl and its media; the encoders named in the config
    writes dump/<encoders-tag>/<split>/{shard-*.safetensors, index.jsonl, provenance.json,
           config.yaml, cmd.txt, .done}
Shards are written atomically one by one; a rerun reuses finished shards (resume) and skips a
finished split. A cache whose provenance names other encoders is refused, not reused.
Scale-out: `--shard i/N` computes only every N-th shard file (i, i+N, ...), so N processes on N
GPUs or nodes split a corpus into the same dump dir; a run without --shard then merges them (it
reuses every finished shard, computes any missing one, and writes the index and `.done`).
Augmentation (augment.noisy_copies K > 0): the train split also holds K seeded copies of every
utterance, babble-noised at a drawn SNR and with a random mouth crop, encoded like the original;
training reads, per utterance and epoch, the original or one copy, drawn uniformly (train_loop.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..augment import babble, fit_length, mix_at_snr, pick_babble_sources
from ..config import Config, snr_values
from ..errors import MavsrError
from ..features import model_digest
from ..fsutil import atomic_file, atomic_write_json, atomic_write_text, clean_stale, sha256_file
from ..media import read_audio, read_video_gray
from ..model.audio_encoder import WhisperAudioEncoder
from ..model.video_encoder import load_video_encoder
from ..progress import bar
from ..recipe import Recipe, is_done, mark_done, resolve_model, write_provenance

SHARD_SIZE = 256  # utterances per shard file


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'i/N' -> (i, N) with 0 <= i < N."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise MavsrError(f"--shard must look like i/N (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise MavsrError(f"--shard {spec}: need 0 <= i < N")
    return i, n


def provenance(recipe: Recipe, cfg: Config) -> dict:
    a, v = cfg.audio_encoder, cfg.video_encoder
    use_a = cfg.model.modality in ("av", "a")
    use_v = cfg.model.modality in ("av", "v")
    return {
        "audio": {"path": a.path, "mode": a.mode, "digest": model_digest(resolve_model(recipe, a.path))} if use_a else None,
        "video": {"path": v.path, "crop": v.crop, "mean": v.mean, "std": v.std,
                  "digest": model_digest(resolve_model(recipe, v.path))} if use_v else None,
    }


def cache_split(cfg: Config, split: str, condition: tuple[str, float] | None = None) -> str:
    """The dump subdir of a split: the train split with augmented copies gets its own, named by a
    hash of the augment settings (train-aug<hash>); a noisy condition gets <split>-<condition>
    (e.g. test-snr0), so clean, augmented and noisy caches coexist."""
    if condition is not None:
        return f"{split}-{condition_name(*condition)}"
    if split != "train" or not cfg.augment.noisy_copies:
        return split
    import hashlib

    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg.augment), sort_keys=True).encode()).hexdigest()[:8]
    return f"train-aug{h}"


def encoders_tag(prov: dict) -> str:
    """dump/<tag>: readable names plus a short hash of everything that shapes the features."""
    import hashlib

    names = [os.path.basename(str(prov[m]["path"]).rstrip("/")) for m in ("audio", "video") if prov[m]]
    h = hashlib.sha256(json.dumps(prov, sort_keys=True).encode()).hexdigest()[:8]
    return "_".join(names + [h])


def video_crop(frames: np.ndarray, crop: int) -> torch.Tensor:
    """(T, H, W) uint8 mouth ROI -> its centre crop (T, crop, crop), uint8 (test-time crop)."""
    t, h, w = frames.shape
    if h < crop or w < crop:
        raise MavsrError(f"mouth ROI of {h}x{w} is smaller than the {crop}x{crop} crop")
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    return torch.from_numpy(np.ascontiguousarray(frames[:, y0:y0 + crop, x0:x0 + crop]))


def normalise(crop: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 pixels -> [0, 1] -> (x - mean) / std, float32 (paper.md, Pipeline 2)."""
    return (crop.float() / 255.0 - mean) / std


def _shard_ok(path, ids: list[str], aug: dict | None) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata()
            return json.loads(md.get("ids", "[]")) == ids and json.loads(md.get("augment", "null")) == aug
    except Exception:
        return False


def random_crop(frames: np.ndarray, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """(T, H, W) -> one random (crop, crop) window for the whole clip (train-time crop)."""
    t, h, w = frames.shape
    if h < crop or w < crop:
        raise MavsrError(f"mouth ROI of {h}x{w} is smaller than the {crop}x{crop} crop")
    y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    return torch.from_numpy(np.ascontiguousarray(frames[:, y0:y0 + crop, x0:x0 + crop]))


class NoiseSource:
    """Noise for one utterance: babble of other speakers' training utterances, white noise, or a
    random segment of a noise file. Babble never uses the utterance itself or its speaker, and
    only the train split (test data never leaks into the noise)."""

    def __init__(self, recipe: Recipe, kind: str, babble_utts: int = 6) -> None:
        from functools import lru_cache

        self.kind, self.k = kind, babble_utts
        self.file = None
        if kind not in ("babble", "white"):
            path = Path(resolve_model(recipe, kind))
            if not path.is_file():
                raise MavsrError(f"noise file not found: {path} (--noise takes babble, white or a file)")
            self.file = read_audio(path)
        self.speakers: dict[str, str] = {}
        if kind == "babble":
            train = recipe.utterances("train")
            self.speakers = {u.id: u.speaker for u in train}
            by_id = {u.id: u for u in train}
            self.wav = lru_cache(maxsize=512)(lambda uid: read_audio(recipe.resolve_media(by_id[uid].audio)))

    def __call__(self, uid: str, speaker: str, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "white":
            return rng.standard_normal(n).astype(np.float32)
        if self.file is not None:
            return fit_length(self.file, n, int(rng.integers(0, max(1, len(self.file)))))
        pool = {u: s for u, s in self.speakers.items() if u != uid}
        pool[uid] = speaker
        srcs = pick_babble_sources(pool, uid, self.k, rng)
        if not srcs:
            raise MavsrError("babble noise needs other utterances in data/train")
        return babble([self.wav(x) for x in srcs], n, rng)


def _seed(*parts) -> list[int]:
    import zlib

    return [zlib.crc32(str(p).encode()) for p in parts]


class Augmenter:
    """The K seeded augmented copies of one training utterance (augment.* in the config):
    babble of other training speakers (or a noise file) at a drawn SNR, and a random mouth crop."""

    def __init__(self, recipe: Recipe, cfg: Config) -> None:
        self.cfg = cfg
        self.snrs = snr_values(cfg.augment)
        self.noise = NoiseSource(recipe, cfg.augment.noise_file or "babble", cfg.augment.babble_utts)

    def settings(self) -> dict:
        """The augment settings as JSON sees them (as written in provenance.json)."""
        return json.loads(json.dumps(dataclasses.asdict(self.cfg.augment)))

    def copy(self, u, k: int, wav: np.ndarray | None, frames: np.ndarray | None):
        a = self.cfg.augment
        rng = np.random.default_rng(_seed(a.seed, u.id, k))
        snr = self.snrs[int(rng.integers(0, len(self.snrs)))]
        noisy = wav
        if wav is not None and snr is not None:
            noisy = mix_at_snr(wav, self.noise(u.id, u.speaker, len(wav), rng), snr)
        crop = None
        if frames is not None:
            vc = self.cfg.video_encoder
            crop = random_crop(frames, vc.crop, rng) if a.random_crop else video_crop(frames, vc.crop)
        return snr, noisy, crop


def condition_name(noise: str, snr: float) -> str:
    """Noisy test condition: 'snr0' for babble (the paper's), 'white_snr5', '<file stem>_snr-5'."""
    kind = "" if noise == "babble" else ("white" if noise == "white" else Path(noise).stem) + "_"
    return f"{kind}snr{snr:g}"


def run(recipe: Recipe, cfg: Config, splits: list[str], force: bool = False, log=print,
        shard: tuple[int, int] | None = None, shard_size: int = SHARD_SIZE,
        condition: tuple[str, float] | None = None) -> str:
    """Extract the splits; `condition` (noise kind, SNR dB) makes a noisy copy of a split instead,
    each utterance's noise seeded by its id so every run gives the same noisy input."""
    prov = provenance(recipe, cfg)
    tag = encoders_tag(prov)
    audio_enc = video_enc = None
    for split in splits:
        utts = recipe.utterances(split)
        out = recipe.dump(tag, cache_split(cfg, split, condition))
        n_copies = cfg.augment.noisy_copies if split == "train" and condition is None else 0
        aug = Augmenter(recipe, cfg) if n_copies else None
        aug_settings = aug.settings() if aug else None
        noise = NoiseSource(recipe, condition[0]) if condition is not None and prov["audio"] else None
        if condition is not None:
            aug_settings = {"noise": condition[0], "snr": condition[1]}
        if is_done(out) and not force:
            old = json.loads((out / "provenance.json").read_text()).get("augment")
            if old != aug_settings:
                raise MavsrError(f"{out.relative_to(recipe.root)} was extracted with other augment settings "
                                 f"({old} vs {aug_settings}); use --force to re-extract")
            log(f"extract-features: {out.relative_to(recipe.root)} is done (use --force to redo)")
            continue
        if out.exists():
            old = out / "provenance.json"
            if old.is_file() and json.loads(old.read_text()).get("encoders") != prov:
                raise MavsrError(f"{out} holds features of other encoders; remove it or use another dump dir")
            if force:
                (out / ".done").unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        if audio_enc is None and prov["audio"]:
            audio_enc = WhisperAudioEncoder.load(resolve_model(recipe, cfg.audio_encoder.path), cfg.audio_encoder.mode)
        if video_enc is None and prov["video"]:
            video_enc = load_video_encoder(resolve_model(recipe, cfg.video_encoder.path))
        atomic_write_json(out / "provenance.json", {"encoders": prov})
        index, dims = [], {}
        chunks = [utts[i:i + shard_size] for i in range(0, len(utts), shard_size)]
        todo = []
        for n, chunk in enumerate(chunks):
            if shard is not None and n % shard[1] != shard[0]:
                continue  # another worker's shard
            name = f"shard-{n:05d}.safetensors"
            ids = [u.id for u in chunk]
            if force or not _shard_ok(out / name, ids, aug_settings):
                todo.append((name, chunk))
        with torch.inference_mode(), bar() as pbar:
            task = pbar.add_task(f"extract {split}", total=sum(len(c) for _, c in todo), info="")
            vcfg = cfg.video_encoder
            for name, chunk in todo:
                tensors, snrs = {}, {}
                for u in chunk:
                    wav = frames = None
                    if audio_enc is not None:
                        wav = read_audio(recipe.resolve_media(u.audio))
                        if noise is not None:  # a noisy test condition, seeded by the utterance
                            rng = np.random.default_rng(_seed("noise", u.id, condition[0], condition[1]))
                            wav = mix_at_snr(wav, noise(u.id, u.speaker, len(wav), rng), condition[1])
                        tensors[f"{u.id}/audio"] = audio_enc(wav).half().contiguous()
                    if video_enc is not None:
                        frames = read_video_gray(recipe.resolve_media(u.video))
                        x = normalise(video_crop(frames, vcfg.crop), vcfg.mean, vcfg.std)
                        tensors[f"{u.id}/video"] = video_enc(x).half().contiguous()
                    for k in range(n_copies):  # seeded augmented copies (train split only)
                        snr, noisy, crop = aug.copy(u, k, wav, frames)
                        snrs.setdefault(u.id, []).append(snr)
                        if noisy is not None:
                            tensors[f"{u.id}/audio#{k}"] = audio_enc(noisy).half().contiguous()
                        if crop is not None:
                            tensors[f"{u.id}/video#{k}"] = video_enc(normalise(crop, vcfg.mean, vcfg.std)).half().contiguous()
                    pbar.advance(task)
                with atomic_file(out / name) as tmp:  # disk full, interrupted: no half shard left behind
                    save_file(tensors, str(tmp), metadata={"ids": json.dumps([u.id for u in chunk]),
                                                           "augment": json.dumps(aug_settings),
                                                           "snrs": json.dumps(snrs)})
        if shard is not None:
            log(f"extract-features {split}: shard {shard[0]}/{shard[1]} done ({len(todo)} shard files written); "
                "run without --shard to merge")
            continue
        sums = {}
        for n, chunk in enumerate(chunks):
            name = f"shard-{n:05d}.safetensors"
            sums[name] = sha256_file(out / name)
            with safe_open(str(out / name), framework="pt") as f:
                snrs = json.loads(f.metadata().get("snrs", "{}"))
                for u in chunk:
                    e = {"id": u.id, "shard": name}
                    if u.id in snrs:
                        e["copies"] = [{"snr": x} for x in snrs[u.id]]
                    for m in ("audio", "video"):
                        if prov[m]:
                            shape = f.get_slice(f"{u.id}/{m}").get_shape()
                            e[f"{m}_len"] = shape[0]
                            dims[m] = shape[1]
                    index.append(e)
        atomic_write_text(out / "index.jsonl", "".join(json.dumps(e) + "\n" for e in index))
        atomic_write_json(out / "provenance.json", {"encoders": prov, "dims": dims, "utterances": len(index),
                                                     "augment": aug_settings, "shards": sums})
        write_provenance(out, cfg.dump())
        mark_done(out)
        log(f"extract-features {split}: {len(index)} utterances -> {out.relative_to(recipe.root)}")
    return tag
