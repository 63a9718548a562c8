"""Stage `prepare`: a corpus on disk -> `data/<split>/manifest.jsonl`.

`prepare synth` first generates the synthetic corpus as an LRS3 tree under `<dir>/corpus/synth/`
(full-face video, `Text:` files, landmark pickles; resumable: finished utterances are kept), then
prepares that tree with `prepare lrs3`'s code, mouth alignment included:
    reads  corpus/synth/{trainval,test}/<speaker>/<utt>.{mp4,txt,pkl}
    writes corpus/lrs3/... (mouth ROIs), data/<split>/manifest.jsonl,
           data/<split>/{skipped.txt,config.yaml,cmd.txt,.done}
Every utterance's media are opened and checked; a missing, unreadable or corrupt file is reported
and skipped (counted in the summary), never a crash with a half-written manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from .. import manifest as mf
from .. import seeds
from ..clocks import FPS
from ..datasets import synth
from ..datasets.lrs_text import format_text
from ..errors import MavsrError
from ..fsutil import atomic_write_pickle, atomic_write_text, clean_stale, inside, sha256_file
from ..media import write_av
from ..options import LrsOptions, SynthOptions
from ..progress import bar, progress
from ..recipe import Recipe, finished, mark_done, write_provenance


def generate_synth(root: Path, opt: SynthOptions, force: bool = False, log=print) -> None:
    """Write the synthetic corpus tree; utterances already on disk are kept (resume). A tree
    generated with other settings is refused, or with `force` generated again from scratch."""
    if opt.speakers < 1 or opt.num_utts < 1 or opt.test_utts < 1:
        raise MavsrError("synth corpus needs at least 1 speaker, 1 train and 1 test utterance")
    if opt.heldout_speakers >= opt.speakers:
        raise MavsrError("--heldout-speakers must leave at least one training speaker")
    if opt.words_per_slot < 0:
        raise MavsrError("--words-per-slot must be 0 (all words) or more")
    # utterances on disk are kept on a rerun, so a rerun must ask for the same corpus (another count
    # is fine: utterance i of a split is drawn the same way); anything else would mix two corpora
    shape = {k: getattr(opt, k) for k in ("seed", "speakers", "heldout_speakers", "words_per_slot")}
    stamp = root / "generator.yaml"
    if stamp.is_file():
        old = yaml.safe_load(stamp.read_text()) or {}
        # a tree from before an option existed was generated with its default
        old = {k: old.get(k, SynthOptions.__dataclass_fields__[k].default) for k in shape}
        diff = {k: (old[k], v) for k, v in shape.items() if old[k] != v}
        said = ", ".join(f"--{k.replace('_', '-')} {v} (was {o})" for k, (o, v) in diff.items())
        if diff and not force:
            raise MavsrError(f"{root} was generated with other settings: {said}; use --force to generate it again")
        if diff:
            import shutil

            log(f"prepare: {said}: generating {root} again")
            shutil.rmtree(root)
    if not stamp.is_file():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, yaml.safe_dump(shape, sort_keys=False))
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
                s = synth.sentence(rng, opt.words_per_slot)
                if split == "train" or s not in seen:
                    break
            seen.add(s)
            texts[job[0], job[2]] = s
    todo = []
    for split, spk, i in jobs:
        stem = root / SYNTH_DIRS[split] / spk.id / f"{i:05d}"
        if not all(stem.with_suffix(ext).is_file() for ext in (".mp4", ".pkl", ".txt")):
            todo.append((split, spk, i, stem))
    if not todo:
        return
    args = [(texts[split, i], spk, seeds.utterance(opt.seed, split, spk.id, i), stem)
            for split, spk, i, stem in todo]
    for _ in parallel_map(_synth_one, args, opt.nj, f"synthesize {len(todo)} utterances"):
        pass


SYNTH_DIRS = {"train": "trainval", "test": "test"}  # LRS3's split dirs


def _synth_one(args) -> None:
    """Worker: synthesize one utterance; write its full-face mp4 (with audio), landmark pickle and
    (last, marking it done) txt."""
    text, spk, seed, stem = args
    rng = np.random.default_rng(seed)
    u = synth.synthesize(text, spk, rng)
    frames, lms = synth.face_video(u.frames, spk, rng)
    write_av(stem.with_suffix(".mp4"), frames, u.audio)
    atomic_write_pickle(stem.with_suffix(".pkl"), lms)
    atomic_write_text(stem.with_suffix(".txt"), format_text(u.text, u.words))


def parallel_map(fn, items: list, nj: int, description: str):
    """Map `fn` over `items` in `nj` spawned processes (in order), with a progress bar."""
    if nj <= 1 or len(items) < 2 * nj:
        yield from (fn(x) for x in progress(items, description))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with bar() as pbar, ProcessPoolExecutor(nj, mp_context=mp.get_context("spawn"),
                                            initializer=_worker_init) as ex:
        task = pbar.add_task(description, total=len(items), info="")
        for r in ex.map(fn, items, chunksize=8):
            pbar.advance(task)
            yield r


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def run_synth(recipe: Recipe, opt: SynthOptions, force: bool = False, log=print) -> dict:
    """`mavsr prepare synth`: generate the corpus, then write one manifest per split."""
    _check_val_share(opt.val_share)
    corpus = recipe.root / "corpus" / "synth"
    settings = {"corpus": "synth", **{k: v for k, v in opt.__dict__.items() if k != "nj"}}
    lrs_opt = LrsOptions(corpus, nj=opt.nj, val_share=opt.val_share)
    if not force and _splits_finished(recipe, _splits("lrs3", lrs_opt), _inputs(recipe, lrs_opt, settings), log):
        return {}
    clean_stale(corpus, recursive=True)
    generate_synth(corpus, opt, force=force, log=log)
    return run_lrs(recipe, "lrs3", lrs_opt, force=force, log=log, settings=settings)


def _inputs(recipe: Recipe, opt: LrsOptions, settings: dict | None, corpus: str = "lrs3") -> dict:
    """What a prepared split is made from (its config.yaml, and its .done to compare on a rerun)."""
    return {**(settings or {"corpus": corpus}), "root": str(opt.root), "landmarks": str(opt.landmarks),
            "mean_face": str(opt.mean_face), "max_seconds": opt.max_seconds,
            **({"val_share": opt.val_share} if corpus == "lrs3" else {}),
            **({"mouth_crops": opt.mouth_crops} if corpus == "dir" else {})}


def _marker(recipe: Recipe, settings: dict) -> dict:
    """The inputs as a .done records them: paths inside the recipe dir relative to it (a moved
    recipe dir is the same recipe)."""
    def rel(v):
        return str(Path(v).relative_to(recipe.root)) if isinstance(v, str) and v.startswith("/") and \
            Path(v).is_relative_to(recipe.root) else v
    return {k: rel(v) for k, v in settings.items()}


def _splits_finished(recipe: Recipe, splits, settings: dict, log) -> bool:
    """True when every split is done from these inputs; one line naming the differences when one
    was made from others; False when any is not done."""
    done = [finished(recipe.data(s), _marker(recipe, settings), f"prepare: data/{s}", log=lambda m: None)
            for s in splits]
    if all(done):
        log(f"prepare: data/{{{','.join(splits)}}} are done (use --force to redo)" if len(splits) > 1
            else f"prepare: data/{splits[0]} is done (use --force to redo)")
    return all(done)


def write_split(recipe: Recipe, split: str, utts: list, skipped: list[str], settings: dict, log) -> tuple[int, int]:
    """data/<split>/: the manifest (whole, atomically), the skip reasons, provenance, .done."""
    d = recipe.data(split)
    clean_stale(d)
    mf.write(d / "manifest.jsonl", utts)
    atomic_write_text(d / "skipped.txt", "".join(s + "\n" for s in skipped))
    write_provenance(d, yaml.safe_dump(settings, sort_keys=False))
    mark_done(d, _marker(recipe, settings))
    hours = sum(u.duration for u in utts) / 3600
    speech = f"{hours:.2f} h" if hours >= 0.1 else f"{hours * 60:.1f} min"  # a small corpus is not '0.00 h'
    log(f"prepare {split}: {len(utts)} utterances ({speech} of speech), {len(skipped)} skipped"
        + (f" (see {d / 'skipped.txt'})" if skipped else ""))
    for s in skipped[:5]:
        log(f"  skipped {s}")
    return len(utts), len(skipped)


# corpus split -> manifest split
SPLIT_MAP = {
    "lrs3": {"pretrain": "train", "trainval": "train", "test": "test"},
    "lrs2": {"pretrain": "train", "train": "train", "val": "val", "test": "test"},
}


def _lrs_one(args):
    """Worker: prepare one utterance, or reuse its record from an earlier run (resume)."""
    import json

    from ..datasets import lrs
    item, root, out_dir, rec_path, landmarks, mean_face, max_seconds, custom, mouth_crops = args
    if rec_path.is_file():
        return json.loads(rec_path.read_text())
    max_s = max_seconds if item.split == "pretrain" or custom else float("inf")  # test etc. stay whole
    res = lrs.process(item, root, out_dir, landmarks, mean_face, max_s, custom=custom, mouth_crops=mouth_crops)
    if isinstance(res, list):
        res = [{**r, "stem": str(r["stem"])} for r in res]
    atomic_write_text(rec_path, json.dumps(res))
    return res


def run_lrs(recipe: Recipe, corpus: str, opt: LrsOptions, force: bool = False, log=print,
            settings: dict | None = None) -> dict:
    """`mavsr prepare lrs3|lrs2|dir`: a tree -> mouth-ROI media under corpus/<corpus>/ and manifests."""
    from ..datasets import lrs
    from ..roi import load_mean_face

    _check_val_share(opt.val_share)
    split_map = SPLIT_MAP.get(corpus, {opt.split: opt.split})
    splits = _splits(corpus, opt)
    info = _inputs(recipe, opt, settings, corpus)
    if not force and opt.shard is None and _splits_finished(recipe, splits, info, log):
        return {}
    root = Path(opt.root)
    if not root.is_dir():
        raise MavsrError(f"--root {root} is not a directory")
    if opt.landmarks is not None and not Path(opt.landmarks).is_dir():
        raise MavsrError(f"--landmarks {opt.landmarks} is not a directory")
    mean_face = load_mean_face(opt.mean_face) if opt.mean_face else None  # read once, checked before any work
    items = {"lrs3": lrs.list_lrs3, "lrs2": lrs.list_lrs2}[corpus](root) if corpus in SPLIT_MAP \
        else lrs.list_dir(root, opt.split)
    items, repeats = lrs.drop_repeats(items) if corpus == "lrs2" else (items, [])
    if repeats:
        log(f"prepare {corpus}: warning: {len(repeats)} videos listed in more than one split list, each kept in one "
            f"(test, then val, then train; listed in the others' skipped.txt): {repeats[0][1]}")
    out_dir = recipe.root / "corpus" / corpus
    records = out_dir / ".records"
    clean_stale(out_dir, recursive=True)
    if force and records.exists():
        import shutil

        shutil.rmtree(records)
    todo = items if opt.shard is None else items[opt.shard[0]::opt.shard[1]]
    args = [(it, root, out_dir, records / it.split / (it.uid or f"{it.speaker}/{it.utt}") / "record.json",
             opt.landmarks, mean_face, opt.max_seconds, corpus == "dir", opt.mouth_crops) for it in todo]
    _check_cached_detector(out_dir, corpus, log)
    results = list(parallel_map(_lrs_one, args, opt.nj, f"prepare {corpus} ({len(todo)} videos)"))
    _log_detection(out_dir, corpus, results, log)
    if opt.shard is not None:
        log(f"prepare {corpus}: shard {opt.shard[0]}/{opt.shard[1]} done ({len(todo)} videos); "
            "run without --shard to merge")
        return {}
    per_split = _by_split(recipe, items, results, split_map, splits, _val_share(corpus, opt))
    for split, why in repeats:
        per_split[split_map[split]][1].append(why)
    summary = {}
    for split, (utts, skipped) in per_split.items():
        if not utts:
            log(f"prepare {split}: no usable utterances ({len(skipped)} skipped)")
            continue
        ids = [u.id for u in utts]
        if len(set(ids)) != len(ids):
            raise MavsrError(f"duplicate utterance ids in {corpus} {split}")
        summary[split] = write_split(recipe, split, sorted(utts, key=lambda u: u.id), skipped, info, log)
    return summary


def _check_cached_detector(out_dir: Path, corpus: str, log) -> None:
    """One line when the landmarks cached by an earlier run's face detection were found by another
    detector than this run's (they are reused as they are)."""
    from .. import faces
    from ..datasets.lrs import cache_detectors

    if not faces.available():  # no detector here to differ from: the cache is all there is
        return
    others = [x for x in cache_detectors(out_dir) if x != faces.describe()]
    if others:
        log(f"prepare {corpus}: warning: corpus/{corpus}/landmarks/ holds landmarks found by another face detector "
            f"({others[0]}); they are reused as they are: remove the dir to detect them again")


def _log_detection(out_dir: Path, corpus: str, results: list, log) -> None:
    """One line on the videos whose landmarks came from face detection, if any did; the cache
    records the detector (datasets.lrs.DETECTED_BY)."""
    found = [r[0]["faces"] for r in results if isinstance(r, list) and r and "faces" in r[0]]
    if found:
        from .. import faces
        from ..datasets.lrs import record_detector

        record_detector(out_dir, faces.describe())
        frames, missed, several = (sum(f[k] for f in found) for k in ("frames", "missed", "several"))
        log(f"prepare {corpus}: faces detected in {len(found)} videos without landmarks (cached under "
            f"corpus/{corpus}/landmarks/): {missed} of {frames} frames without a face (filled in from their "
            f"neighbours), {several} with several faces (the one nearest the last kept)")


def _by_split(recipe: Recipe, items: list, results: list, split_map: dict, splits: list[str],
              val_share: float) -> dict[str, tuple[list, list]]:
    """Per manifest split: (utterances, skip reasons). `val_share` > 0 holds out that share of
    trainval (by utterance id) as val, at least one utterance."""
    per_split: dict[str, tuple[list, list]] = {s: ([], []) for s in splits}
    for it, res in zip(items, results, strict=True):
        utts, skipped = per_split[split_map[it.split]]
        if val_share and it.split == "trainval" and not isinstance(res, str):
            utts, skipped = per_split["val" if _held_out(res[0]["id"], val_share) else "train"]
        if isinstance(res, str):
            skipped.append(res)
            continue
        for r in res:
            stem = Path(r["stem"])
            rel = stem.relative_to(recipe.root) if stem.is_relative_to(recipe.root) else stem
            utts.append(mf.Utterance(id=r["id"], video=str(rel.with_suffix(".mp4")), audio=str(rel.with_suffix(".wav")),
                                     text=r["text"], num_frames=r["num_frames"], duration=r["duration"],
                                     speaker=r["speaker"]))
    if val_share and not per_split["val"][0]:  # a tiny corpus: one, at least
        trainval = [u for u in per_split["train"][0] if "/trainval/" in f"/{u.video}"]
        if len(trainval) > 1:
            first = min(trainval, key=lambda u: _rank(u.id))
            per_split["train"][0].remove(first)
            per_split["val"][0].append(first)
    return per_split


def _check_val_share(share: float) -> None:
    """A share held out of training: at least 0 and below 1 (all of it would leave no train split)."""
    if not 0 <= share < 1:
        raise MavsrError(f"--val-share must be at least 0 and below 1, got {share:g}")


def _val_share(corpus: str, opt: LrsOptions) -> float:
    """The share of trainval held out as data/val: lrs3's (and synth's) only, 0 for the others."""
    return opt.val_share if corpus == "lrs3" and opt.val_share > 0 else 0.0


def _splits(corpus: str, opt: LrsOptions) -> list[str]:
    """The manifest splits a corpus gives (lrs3: val too when a share of trainval is held out)."""
    val = {"val"} if _val_share(corpus, opt) else set()
    return sorted(set(SPLIT_MAP.get(corpus, {opt.split: opt.split}).values()) | val)


def _rank(uid: str) -> float:
    """A number in [0, 1) fixed by the utterance id: which utterances are held out does not depend
    on the order they were listed in, and a larger corpus keeps the assignment of the smaller."""
    import hashlib

    return int(hashlib.sha256(uid.encode()).hexdigest()[:12], 16) / 16 ** 12


def _held_out(uid: str, share: float) -> bool:
    return _rank(uid) < share


def run_csv(recipe: Recipe, csv_path: Path, data_root: Path, split: str, force: bool = False, log=print) -> dict:
    """`mavsr prepare csv`: the LLM-AVSR research code's label list -> data/<split>/manifest.jsonl.

    Lines `dataset_name,relative_path,num_video_frames,token_ids,text` (no header); media are
    `<data_root>/<dataset_name>/<relative_path>` (mp4, already mouth ROIs) with the audio beside it
    as `.wav`. The old token ids are ignored; the media are not re-encoded, only checked to exist."""
    import csv

    if not Path(csv_path).is_file():
        raise MavsrError(f"label list not found: {csv_path}")
    settings = {"corpus": "csv", "csv": str(csv_path), "data_root": str(data_root), "csv_sha256": sha256_file(csv_path)}
    if not force and _splits_finished(recipe, (split,), settings, log):
        return {}
    utts, skipped = [], []
    try:
        lines = Path(csv_path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MavsrError(f"{csv_path}: unreadable label list ({e})") from None
    for n, row in enumerate(csv.reader(lines), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 5:
            skipped.append(f"line {n}: expected 5 fields (dataset,path,frames,token_ids,text), got {len(row)}")
            continue
        dataset, rel, frames, _, text = row[0], row[1], row[2], row[3], ",".join(row[4:])
        video = Path(data_root) / dataset / rel
        if video.suffix != ".mp4":
            video = video.with_suffix(".mp4")
        wav = video.with_suffix(".wav")
        if not inside(video, Path(data_root) / dataset) or not inside(Path(data_root) / dataset, data_root):
            skipped.append(f"line {n}: {dataset}/{rel}: path escapes the data root {data_root}")
            continue
        try:
            num_frames = int(frames)
        except ValueError:
            skipped.append(f"line {n}: frame count {frames!r} is not a number")
            continue
        missing = [p.name for p in (video, wav) if not p.is_file()]
        if missing:
            skipped.append(f"line {n}: {dataset}/{rel}: missing {', '.join(missing)}")
            continue
        if not text.strip():
            skipped.append(f"line {n}: {dataset}/{rel}: empty transcript")
            continue
        key = Path(rel).with_suffix("").as_posix()
        utts.append(mf.Utterance(id=f"{dataset}-{key.replace('/', '-')}", video=str(video), audio=str(wav),
                                 text=" ".join(text.lower().split()), num_frames=num_frames,
                                 duration=round(num_frames / FPS, 3), speaker=Path(key).parent.name or key))
    if not utts:
        first = f"; the first: {skipped[0]}" if skipped else ""
        raise MavsrError(f"no usable lines in {csv_path} ({len(skipped)} skipped{first})")
    utts.sort(key=lambda u: u.id)
    if len({u.id for u in utts}) != len(utts):
        raise MavsrError(f"duplicate utterances in {csv_path}")
    return {split: write_split(recipe, split, utts, skipped, settings, log)}
