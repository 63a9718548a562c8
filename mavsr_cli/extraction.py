"""Encoding a split once: manifests -> native-rate encoder features in the cache (features.py).

The engine behind `extract-features` and behind the noisy test conditions that `decode` and
`bench` encode on demand. Per split:
    reads  data/<split>/manifest.jsonl and its media; the encoders named in the config
    writes dump/<encoders-tag>/<split>/{shard-*.safetensors, index.jsonl, provenance.json,
           config.yaml, cmd.txt, .done}
Shards are written atomically one by one; a rerun reuses finished shards (resume) and skips a
finished split. A cache whose provenance names other encoders is refused, not reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import devices
from .augment import Augmenter, NoiseSource
from .config import Config
from .errors import MavsrError
from .features import cache_split, encoders_tag, provenance
from .fsutil import atomic_file, atomic_write_json, atomic_write_text, clean_stale, sha256_file
from .media import encoder_video, fit_audio, read_audio, read_mouth_roi
from .model.audio_encoder import WhisperAudioEncoder
from .model.video_encoder import load_video_encoder
from .options import DEVICE, SHARD_SIZE
from .progress import bar
from .rates import condition_name
from .recipe import Recipe, finished, is_done, mark_done, resolve_model, write_provenance
from .sharding import Shard

ENCODE_BATCH = 8  # clips per encoder call (benchmarks/vs_authors.md)
Condition = tuple[str, float]  # a noisy copy of a split: (noise kind or file, SNR in dB)


class Encoders:
    """The frozen encoders a config names, loaded on first use; `inputs` reads an utterance (and makes
    its augmented copies), `encode` turns the inputs of several into fp16 features (T, D), batched."""

    def __init__(self, recipe: Recipe, cfg: Config, prov: dict, device: torch.device | None = None) -> None:
        self.recipe, self.cfg, self.prov = recipe, cfg, prov
        self.device = device or torch.device("cpu")  # where the encoders run; features are stored from the CPU
        self.audio = self.video = None

    def load(self) -> None:
        if self.audio is None and self.prov["audio"]:
            a = self.cfg.audio_encoder
            self.audio = WhisperAudioEncoder.from_config(resolve_model(self.recipe, a.path), a).to(self.device)
        if self.video is None and self.prov["video"]:
            path = resolve_model(self.recipe, self.cfg.video_encoder.path)
            self.video = load_video_encoder(path).to(self.device)

    def inputs(self, u, noise: NoiseSource | None, snr: float | None, aug: Augmenter | None,
               n_copies: int) -> tuple[dict, dict, list]:
        """One utterance's encoder inputs: ({"<id>/audio": wav, "<id>/audio#k": ...}, {"<id>/video":
        (T, crop, crop), ...}, SNRs of the copies)."""
        vc = self.cfg.video_encoder
        audio, video, wav, frames = {}, {}, None, None
        if self.video is not None:
            frames = read_mouth_roi(self.recipe.resolve_media(u.video), vc.fps, u.num_frames, u.id)  # (T, 96, 96)
            video[f"{u.id}/video"] = encoder_video(frames, vc)  # (T, crop, crop), as transcribe gives it
        if self.audio is not None:
            wav = read_audio(self.recipe.resolve_media(u.audio))
            if frames is not None and self.cfg.audio_encoder.fit_video:
                wav = fit_audio(wav, len(frames), vc.fps)
            if noise is not None:  # a noisy test condition, seeded by the utterance
                wav = noise.add(wav, u.id, u.speaker, snr)
            audio[f"{u.id}/audio"] = wav
        snrs = []
        for k in range(n_copies):  # seeded augmented copies (train split only)
            copy_snr, noisy, crop = aug.copy(u, k, wav, frames)
            snrs.append(copy_snr)
            if noisy is not None:
                audio[f"{u.id}/audio#{k}"] = noisy
            if crop is not None:
                video[f"{u.id}/video#{k}"] = crop
        return audio, video, snrs

    def encode(self, audio: dict, video: dict) -> dict[str, torch.Tensor]:
        """fp16 features (T, D) of every input. An encoder whose rows do not depend on the rest of
        the batch (faithful Whisper: every clip is one 30 s window) takes ENCODE_BATCH at a time;
        the others (padded to the longest clip, masked) one at a time, so a cache is the same to
        the bit however the work is split into shards, workers and resumed runs (tested)."""
        out = {}
        for enc, items in ((self.audio, audio), (self.video, video)):
            keys = list(items)  # a waveform is read by the extractor on the CPU; mouth crops go to the device
            inputs = [items[k].to(self.device) if torch.is_tensor(items[k]) else items[k] for k in keys]
            out.update({k: h.half().cpu().contiguous() for k, h in zip(keys, encode_grouped(enc, inputs),
                                                                        strict=True)})
        return out


def encode_grouped(enc, items: list, isolate: bool = False, on_call=None) -> list:
    """Each item's features (T, D), in the items' order, through `enc.encode_batch`: ENCODE_BATCH per
    call, longest first, for an encoder whose rows do not depend on the rest of the batch
    (`batch_invariant`: faithful Whisper), one per call for the others. With `isolate` (serve: one
    bad upload fails alone), a group whose call fails is encoded again one item per call, and an
    item that fails alone gets its exception in its place instead of raising. `on_call(n)` is told
    the size of each call that succeeded."""
    order = sorted(range(len(items)), key=lambda k: -len(items[k]))
    step = ENCODE_BATCH if getattr(enc, "batch_invariant", False) else 1
    out: list = [None] * len(items)
    for i in range(0, len(order), step):
        _encode_group(enc, items, order[i:i + step], out, isolate, on_call)
    return out


def _encode_group(enc, items: list, group: list[int], out: list, isolate: bool, on_call) -> None:
    """One encoder call for the items at `group`, into `out` (see encode_grouped)."""
    try:
        h, lens = enc.encode_batch([items[k] for k in group])  # (B, T, D) zero-padded, (B,)
    except Exception as err:
        if not isolate:
            raise
        if len(group) == 1:
            out[group[0]] = err
        else:  # only this group's items again, each alone
            for k in group:
                _encode_group(enc, items, [k], out, isolate, on_call)
        return
    if on_call is not None:
        on_call(len(group))
    for j, k in enumerate(group):
        out[k] = h[j, : lens[j]]


@dataclass
class SplitJob:
    """One split's extraction: where it goes and what varies its features."""

    split: str
    out: Path
    n_copies: int  # augmented copies per utterance (train split only)
    aug: Augmenter | None
    noise: NoiseSource | None
    snr: float | None
    settings: dict | None  # augment settings, or the noisy condition, as recorded in the shards


def extract(recipe: Recipe, cfg: Config, splits: list[str], force: bool = False, log=print,
            shard: Shard | None = None, shard_size: int = SHARD_SIZE, condition: Condition | None = None,
            device: str = DEVICE) -> str:
    """Extract the splits; returns the encoders tag (dump/<tag>/). `condition` makes a noisy copy
    of a split instead, each utterance's noise seeded by its id so every run gives the same input.
    `device` (devices.resolve) is where the encoders run; each shard file records its type."""
    prov = provenance(recipe, cfg)
    tag = encoders_tag(prov)
    encoders = Encoders(recipe, cfg, prov, devices.resolve(device))  # a device not here: refused before any write
    plans = []  # every split is checked (manifest, settings, device of a resume) before any is written
    for split in splits:
        utts = recipe.utterances(split)  # the manifest first: a missing one fails before any write
        job = _job(recipe, cfg, split, tag, prov, condition)
        inputs = {"manifest": sha256_file(recipe.manifest(split)), "augment": job.settings}
        if not _finished(recipe, job, prov, inputs, force, log):
            chunks = [utts[i:i + shard_size] for i in range(0, len(utts), shard_size)]
            plans.append((job, inputs, chunks, _todo(job, chunks, shard, force, encoders.device.type, recipe)))
    for job, inputs, chunks, todo in plans:
        job.out.mkdir(parents=True, exist_ok=True)
        clean_stale(job.out)
        encoders.load()
        atomic_write_json(job.out / "provenance.json", {"encoders": prov})
        n_written = _write_shards(job, encoders, todo)
        if shard is not None:
            log(f"extract-features {job.split}: shard {shard[0]}/{shard[1]} done ({n_written} shard files written); "
                "run without --shard to merge")
            continue
        n = _write_index(job, prov, chunks)
        write_provenance(job.out, cfg.dump())
        mark_done(job.out, inputs)
        hours = sum(u.duration for chunk in chunks for u in chunk) / 3600
        log(f"extract-features {job.split}: {n} utterances ({hours:.2f} h of speech) -> "
            f"{job.out.relative_to(recipe.root)}")
    return tag


def _job(recipe: Recipe, cfg: Config, split: str, tag: str, prov: dict, condition: Condition | None) -> SplitJob:
    if condition is not None:
        noise = NoiseSource(recipe, condition[0]) if prov["audio"] else None
        out = recipe.dump(tag, cache_split(cfg, split, condition_name(*condition)))
        return SplitJob(split, out, 0, None, noise, condition[1], {"noise": condition[0], "snr": condition[1]})
    n_copies = cfg.augment.noisy_copies if split == "train" else 0
    aug = Augmenter(recipe, cfg) if n_copies else None
    out = recipe.dump(tag, cache_split(cfg, split))
    return SplitJob(split, out, n_copies, aug, None, None, aug.settings() if aug else None)


def _finished(recipe: Recipe, job: SplitJob, prov: dict, inputs: dict, force: bool, log) -> bool:
    """True when the split is done from these inputs (the manifest's checksum, the augment settings);
    refuses a cache of other encoders, settings or manifest."""
    out = job.out
    if is_done(out) and not force:
        old = json.loads((out / "provenance.json").read_text()).get("augment")
        if old != job.settings:
            raise MavsrError(f"{out.relative_to(recipe.root)} was extracted with other augment settings "
                             f"({old} vs {job.settings}); use --force to re-extract")
        return finished(out, inputs, f"extract-features: {out.relative_to(recipe.root)}", log)
    if out.exists():
        old = out / "provenance.json"
        if old.is_file() and json.loads(old.read_text()).get("encoders") != prov:
            raise MavsrError(f"{out} holds features of other encoders; remove it or use another dump dir")
        if force:
            (out / ".done").unlink(missing_ok=True)
    return False


def _shard_name(n: int) -> str:
    return f"shard-{n:05d}.safetensors"


def _finished_shard(path: Path, ids: list[str], settings: dict | None) -> dict | None:
    """The metadata of the shard file at `path` if it is finished for these utterances and settings."""
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata()
    except Exception:
        return None
    ok = json.loads(md.get("ids", "[]")) == ids and json.loads(md.get("augment", "null")) == settings
    return md if ok else None


def _shard_device(md: dict) -> str:
    """The device type a shard file was encoded on (shards written before devices were recorded: the CPU)."""
    return md.get("device", "cpu")


def _todo(job: SplitJob, chunks: list[list], shard: Shard | None, force: bool, device: str, recipe: Recipe) -> list:
    """(name, utterances) of the shard files this worker owns that are not finished yet. A cache is the
    same to the bit however it is split and resumed only on one device type, so a run that would
    finish its share on another type than its finished shards' is refused (--force re-extracts);
    `--shard` workers on different devices each keep to their own (provenance.json lists them all)."""
    todo, done = [], []
    for n, chunk in enumerate(chunks):
        path = job.out / _shard_name(n)
        if shard is not None and n % shard[1] != shard[0]:
            continue  # another worker's shard
        md = None if force else _finished_shard(path, [u.id for u in chunk], job.settings)
        if md is None:
            todo.append((path.name, chunk))
        else:
            done.append((path.name, _shard_device(md)))
    was: dict[str, str] = {}  # device type -> its first finished shard; none for a merge (any device gathers)
    for name, dev in done if todo else []:
        was.setdefault(dev, name)
    if len(was) > 1:
        raise MavsrError(f"{job.out.relative_to(recipe.root)} holds shards encoded on {' and '.join(sorted(was))}; "
                         "finish each --shard i/N worker on its own device, or re-extract with --force")
    if was and (other := next(iter(was))) != device:
        raise MavsrError(f"{job.out.relative_to(recipe.root)}/{was[other]} was encoded on {other}, this run would "
                         f"encode on {device}; resume with --device {other}, or re-extract with --force")
    return todo


def _write_shards(job: SplitJob, encoders: Encoders, todo: list) -> int:
    """Encode and write the shard files `todo` (_todo); returns how many."""
    with torch.inference_mode(), bar() as pbar:
        task = pbar.add_task(f"extract {job.split}", total=sum(len(c) for _, c in todo), info="")
        for name, chunk in todo:
            tensors, snrs = {}, {}
            for i in range(0, len(chunk), ENCODE_BATCH):
                audio, video = {}, {}
                for u in chunk[i:i + ENCODE_BATCH]:
                    a, v, copy_snrs = encoders.inputs(u, job.noise, job.snr, job.aug, job.n_copies)
                    audio.update(a)
                    video.update(v)
                    if copy_snrs:
                        snrs[u.id] = copy_snrs
                tensors.update(encoders.encode(audio, video))
                pbar.advance(task, len(chunk[i:i + ENCODE_BATCH]))
            with atomic_file(job.out / name) as tmp:  # disk full, interrupted: no half shard left behind
                save_file(tensors, str(tmp), metadata={"ids": json.dumps([u.id for u in chunk]),
                                                       "augment": json.dumps(job.settings),
                                                       "snrs": json.dumps(snrs),
                                                       "device": encoders.device.type})
    return len(todo)


def _write_index(job: SplitJob, prov: dict, chunks: list[list]) -> int:
    """index.jsonl and the final provenance.json (dims, shard checksums) over every shard file."""
    index, dims, sums, where = [], {}, {}, set()
    for n, chunk in enumerate(chunks):
        name = _shard_name(n)
        sums[name] = sha256_file(job.out / name)
        with safe_open(str(job.out / name), framework="pt") as f:
            snrs = json.loads(f.metadata().get("snrs", "{}"))
            where.add(_shard_device(f.metadata()))
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
    atomic_write_text(job.out / "index.jsonl", "".join(json.dumps(e) + "\n" for e in index))
    atomic_write_json(job.out / "provenance.json", {"encoders": prov, "dims": dims, "utterances": len(index),
                                                     "augment": job.settings, "shards": sums,
                                                     "devices": sorted(where)})
    return len(index)
