"""Stage `decode`: a trained experiment + cached features -> hypotheses at one rate pair.

    reads  exp/<tag>/{config.yaml, ckpt/step-*/}, dump/<encoders-tag>/<split>/, data/<split>/manifest.jsonl
    writes exp/<tag>/decode_<rates>_greedy/<split>/{hyp.jsonl, config.yaml, cmd.txt, .done}
Greedy search, deterministic (do_sample=False): a rerun gives the same hypotheses. Rates outside
the checkpoint's trained grid are refused before any work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import checkpoint
from .. import config as config_mod
from .. import manifest as mf
from ..errors import MavsrError
from ..features import FeatureStore
from ..model.build import build_model
from ..progress import bar
from ..rates import Rates, require
from ..recipe import Recipe, atomic_write_text, is_done, resolve_model, staged_dir, write_provenance
from ..train_loop import batch_features


def decode_dir(exp: Path, rates: Rates, split: str) -> Path:
    return exp / f"decode_{rates.tag}_greedy" / split


def load_experiment(recipe: Recipe, exp: Path):
    if not (exp / "config.yaml").is_file():
        raise MavsrError(f"{exp} is not an experiment dir (no config.yaml)")
    cfg = config_mod.load(exp / "config.yaml")
    ckpt = checkpoint.for_decoding(exp)
    meta = checkpoint.read_meta(ckpt)
    return cfg, ckpt, meta


def run(recipe: Recipe, exp: Path, split: str, audio_rate: int | None, video_rate: int | None,
        batch_size: int | None = None, max_new_tokens: int | None = None, force: bool = False, log=print) -> Path:
    exp = Path(exp) if Path(exp).is_absolute() else recipe.root / exp
    cfg, ckpt, meta = load_experiment(recipe, exp)
    trained = [Rates.parse(t) for t in meta["rates"]]
    if audio_rate is None and video_rate is None:
        raise MavsrError(f"give --audio-rate and/or --video-rate; trained grid: {', '.join(meta['rates'])}")
    rates = Rates(audio_rate, video_rate)
    require(rates, trained)
    out = decode_dir(exp, rates, split)
    if is_done(out) and not force:
        log(f"decode: {out.relative_to(recipe.root)} is done (use --force to redo)")
        return out
    utts = {u.id: u for u in mf.read(recipe.require_manifest(split))}
    store = FeatureStore(recipe.dump(meta["encoders_tag"], split))
    ids = [i for i in store.ids() if i in utts]
    if not ids:
        raise MavsrError(f"no utterances of split {split!r} in the feature cache")
    model = build_model(cfg, meta["dims"].get("audio"), meta["dims"].get("video"),
                        llm_path=resolve_model(recipe, cfg.model.llm), rates=trained)
    model.load_trainable(checkpoint.load_state(ckpt))
    model.eval()
    bs = batch_size or cfg.decode.batch_size
    mnt = max_new_tokens or cfg.decode.max_new_tokens
    lines = []
    with staged_dir(out) as tmp, torch.inference_mode(), bar() as pbar:
        task = pbar.add_task(f"decode {rates.tag} {split}", total=len(ids), info="")
        for b in range(0, len(ids), bs):
            bid = ids[b:b + bs]
            t0 = time.perf_counter()
            hyps, n_in = model.generate(batch_features(store, bid, cfg.model.modality), rates, mnt)
            dt = (time.perf_counter() - t0) / len(bid)
            for i, h, n in zip(bid, hyps, n_in, strict=True):
                lines.append({"id": i, "ref": utts[i].text, "hyp": h, "tokens_in": n,
                              "duration": utts[i].duration, "time": round(dt, 5)})
            pbar.advance(task, len(bid))
        atomic_write_text(tmp / "hyp.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
        opts = {"checkpoint": ckpt.name, "rates": rates.tag, "split": split, "search": "greedy",
                "batch_size": bs, "max_new_tokens": mnt}
        write_provenance(tmp, cfg.dump() + "decode_options:\n"
                         + "".join(f"  {k}: {v}\n" for k, v in opts.items()))
    log(f"decode: {len(lines)} utterances at {rates.tag} -> {out.relative_to(recipe.root)}")
    return out
