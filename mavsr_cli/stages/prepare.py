"""Stage `prepare`: a corpus on disk -> `data/<split>/manifest.jsonl`.

`prepare synth` first generates the synthetic corpus tree under `<dir>/corpus/synth/` (resumable:
finished utterances are kept), then reads that tree like any LRS3-shaped tree:
    reads  corpus/synth/<split>/<speaker>/<utt>.{mp4,wav,txt}
    writes data/<split>/manifest.jsonl, data/<split>/{skipped.txt,config.yaml,cmd.txt,.done}
Every utterance's media are opened and checked; a missing, unreadable or corrupt file is reported
and skipped (counted in the summary), never a crash with a half-written manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .. import manifest as mf
from ..datasets import synth
from ..datasets.lrs_text import format_text, parse_text
from ..errors import MavsrError
from ..media import FPS, MediaError, read_audio, read_video_gray, write_av, write_wav
from ..progress import progress
from ..recipe import Recipe, atomic_write_text, is_done, mark_done, write_provenance


@dataclass(frozen=True)
class SynthOptions:
    num_utts: int = 400  # utterances in the train split (the test split gets test_utts)
    test_utts: int = 60  # utterances in the test split
    speakers: int = 4  # number of synthetic speakers (voices + faces)
    heldout_speakers: int = 0  # speakers kept out of train and used only in test
    seed: int = 0  # everything is a function of this seed


def generate_synth(root: Path, opt: SynthOptions, log=print) -> None:
    """Write the synthetic corpus tree; utterances already on disk are kept (resume)."""
    if opt.speakers < 1 or opt.num_utts < 1 or opt.test_utts < 1:
        raise MavsrError("synth corpus needs at least 1 speaker, 1 train and 1 test utterance")
    if opt.heldout_speakers >= opt.speakers:
        raise MavsrError("--heldout-speakers must leave at least one training speaker")
    speakers = [synth.make_speaker(opt.seed, i) for i in range(opt.speakers)]
    train_spk = speakers[: opt.speakers - opt.heldout_speakers]
    test_spk = speakers[opt.speakers - opt.heldout_speakers:] if opt.heldout_speakers else speakers
    jobs = []
    for split, n, spks in (("train", opt.num_utts, train_spk), ("test", opt.test_utts, test_spk)):
        for i in range(n):
            jobs.append((split, spks[i % len(spks)], i))
    # sentences are drawn from one stream per split; the test split never repeats a train sentence
    seen: set[str] = set()
    texts = {}
    for split in ("train", "test"):
        rng = np.random.default_rng([opt.seed, 7 if split == "train" else 11])
        for job in [j for j in jobs if j[0] == split]:
            for _ in range(1000):
                s = synth.sentence(rng)
                if split == "train" or s not in seen:
                    break
            seen.add(s)
            texts[job[0], job[2]] = s
    todo = []
    for split, spk, i in jobs:
        stem = root / split / spk.id / f"{i:05d}"
        if not all(stem.with_suffix(ext).is_file() for ext in (".mp4", ".wav", ".txt")):
            todo.append((split, spk, i, stem))
    if not todo:
        return
    for split, spk, i, stem in progress(todo, f"synthesize {len(todo)} utterances"):
        rng = np.random.default_rng(synth.utterance_seed(opt.seed, split, spk.id, i))
        u = synth.synthesize(texts[split, i], spk, rng)
        write_av(stem.with_suffix(".mp4"), u.frames, u.audio)
        write_wav(stem.with_suffix(".wav"), u.audio)
        atomic_write_text(stem.with_suffix(".txt"), format_text(u.text, u.words))  # last: marks done


def read_tree_split(recipe: Recipe, split_dir: Path) -> tuple[list[mf.Utterance], list[str]]:
    """Read `<split>/<speaker>/<utt>.mp4 + .txt` into utterances; bad ones become skip reasons."""
    utts, skipped = [], []
    mp4s = sorted(split_dir.glob("*/*.mp4"))
    txts = sorted(split_dir.glob("*/*.txt"))
    for t in txts:
        if not t.with_suffix(".mp4").exists():
            skipped.append(f"{t.relative_to(recipe.root)}: missing video {t.with_suffix('.mp4').name}")
    for video in progress(mp4s, f"check {split_dir.name}"):
        rel = video.relative_to(recipe.root)
        try:
            text, _ = parse_text(video.with_suffix(".txt"))
            frames = read_video_gray(video)
            wav = video.with_suffix(".wav")
            audio_path = wav if wav.is_file() else video
            audio = read_audio(audio_path)
        except MediaError as e:
            skipped.append(f"{rel}: {e}")
            continue
        except MavsrError as e:
            skipped.append(f"{rel}: {e}")
            continue
        speaker = video.parent.name
        utts.append(mf.Utterance(
            id=f"{speaker}-{video.stem}",
            video=str(rel),
            audio=str(audio_path.relative_to(recipe.root)),
            text=text.lower(),
            num_frames=int(frames.shape[0]),
            duration=round(max(frames.shape[0] / FPS, len(audio) / 16000), 3),
            speaker=speaker,
        ))
    return utts, skipped


def run_synth(recipe: Recipe, opt: SynthOptions, force: bool = False, log=print) -> dict:
    """`mavsr prepare synth`: generate the corpus, then write one manifest per split."""
    splits = ("train", "test")
    if not force and all(is_done(recipe.data(s)) for s in splits):
        log("prepare: data/train and data/test are done (use --force to redo)")
        return {}
    corpus = recipe.root / "corpus" / "synth"
    generate_synth(corpus, opt, log=log)
    summary = {}
    for split in splits:
        utts, skipped = read_tree_split(recipe, corpus / split)
        if not utts:
            raise MavsrError(f"no usable utterances in {corpus / split} ({len(skipped)} skipped)")
        d = recipe.data(split)
        mf.write(d / "manifest.jsonl", utts)
        atomic_write_text(d / "skipped.txt", "".join(s + "\n" for s in skipped))
        write_provenance(d, yaml.safe_dump({"corpus": "synth", **opt.__dict__}, sort_keys=False))
        mark_done(d)
        summary[split] = (len(utts), len(skipped))
        log(f"prepare {split}: {len(utts)} utterances, {len(skipped)} skipped"
            + (f" (see {d / 'skipped.txt'})" if skipped else ""))
        for s in skipped[:5]:
            log(f"  skipped {s}")
    return summary
