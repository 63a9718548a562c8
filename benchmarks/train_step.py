"""Training-step throughput: feature cache vs encoders on the fly, and the Matryoshka step vs separate steps.

A mid-size random model that fits a laptop: Whisper-base-shaped audio encoder (512 wide, 6
layers), an AV-HuBERT-shaped video encoder (ResNet front end + 6 transformer layers, 512 wide,
written as a fairseq checkpoint and read back by mavsr's reader), a Llama of 512 x 8 layers, LoRA
r16 on q/v, projectors 1024 wide. The corpus is `prepare synth` output; the cache is made by the
real `extract-features` stage. Every figure is a median over interleaved repetitions in one run.

  cache      one training step (4 configurations, MS) on features read from the cache, with one
             backward (train.backward: joint): under MS the configurations run in one LLM pass,
             their rows merged (model/merged.py)
  on the fly the same step, but decoding the media and running both frozen encoders first
             (Whisper padded to 30 s), as the reference code does every step
  per_config the same step, each configuration's forward and backward in turn (the default:
             one configuration's graph held at a time), 4 LLM passes
  separate   the sum of 4 single-configuration steps (4 separate models, one step each)

    python benchmarks/train_step.py [--utts 16] [--batch 8] [--reps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import emit

import mavsr_cli  # noqa: F401  (torchaudio guard before transformers)
from mavsr_cli import config as C
from mavsr_cli import manifest as mf
from mavsr_cli.datasets import synth
from mavsr_cli.features import FeatureStore, batch_features, encoders_tag, pad_batch, provenance
from mavsr_cli.media import encoder_video, read_audio, read_mouth_roi
from mavsr_cli.model import llm as llm_mod
from mavsr_cli.model.audio_encoder import WhisperAudioEncoder
from mavsr_cli.model.avhubert import AVHubertConfig, AVHubertVideoEncoder
from mavsr_cli.model.build import build_model
from mavsr_cli.model.video_encoder import load_video_encoder
from mavsr_cli.recipe import Recipe
from mavsr_cli.stages import extract_features as ef
from mavsr_cli.stages import prepare
from mavsr_cli.train_loop import MatryoshkaLoss, matryoshka_backward

VIDEO = AVHubertConfig(encoder_layers=6, encoder_embed_dim=512, encoder_ffn_embed_dim=2048,
                       encoder_attention_heads=8, resnet_channels=32)


def setup(root: Path, utts: int, log) -> tuple[Recipe, C.Config]:
    r = Recipe(root)
    prepare.run_synth(r, prepare.SynthOptions(num_utts=utts, test_utts=2, speakers=2, nj=2), log=log)
    models = root / "models"
    WhisperAudioEncoder.tiny(models / "whisper", d_model=512, layers=6, heads=8)
    torch.manual_seed(0)
    enc = AVHubertVideoEncoder(VIDEO)
    torch.save({"model": enc.fairseq_state(), "cfg": {"model": {**VIDEO.__dict__, "_name": "av_hubert"}}},
               models / "avhubert_mid.pt")
    llm_mod.tiny(models / "llm", synth.vocabulary() + "transcribe speech and video to text".split(),
                 hidden=512, layers=8, heads=8)
    cfg = C.from_dict({
        "audio_encoder": {"path": str(models / "whisper"), "mode": "faithful"},  # the reference code's way
        "video_encoder": {"path": str(models / "avhubert_mid.pt")},
        "model": {"llm": str(models / "llm"), "projector_hidden": 1024,
                  "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}},
    })
    ef.run(r, cfg, ["train"], log=log)
    return r, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utts", type=int, default=16, help="training utterances generated")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    quiet = lambda m: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        recipe, cfg = setup(Path(tmp), args.utts, quiet)
        tag = encoders_tag(provenance(recipe, cfg))
        store = FeatureStore(recipe.dump(tag, "train"))
        utts = {u.id: u for u in mf.read(recipe.require_manifest("train"))}
        audio_enc = WhisperAudioEncoder.from_config(cfg.audio_encoder.path, cfg.audio_encoder)
        video_enc = load_video_encoder(cfg.video_encoder.path).eval()
        dims = store.provenance["dims"]
        model = build_model(cfg, dims["audio"], dims["video"], seed=0)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        grid = model.grid
        tok = model.tokenizer
        ids = store.ids()[: args.batch]
        targets = [tok(utts[i].text, add_special_tokens=False).input_ids for i in ids]
        n_tok = sum(len(t) + 1 for t in targets)
        seconds = sum(utts[i].duration for i in ids)

        def on_the_fly():
            vc = cfg.video_encoder
            with torch.inference_mode():
                a = [audio_enc(read_audio(recipe.resolve_media(utts[i].audio))) for i in ids]
                v = [video_enc(encoder_video(read_mouth_roi(recipe.resolve_media(utts[i].video), vc.fps), vc))
                     for i in ids]
            return {"audio": pad_batch([x.clone() for x in a]), "video": pad_batch([x.clone() for x in v])}

        def step(feats, rates, per_config=False):
            opt.zero_grad(set_to_none=True)
            matryoshka_backward(MatryoshkaLoss(model, rates, False), feats, targets, len(rates),
                                1 / len(rates) / n_tok, per_config)
            opt.step()

        cases = {
            "cache": lambda: step(batch_features(store, ids, "av"), grid),
            "on the fly": lambda: step(on_the_fly(), grid),
            "per_config": lambda: step(batch_features(store, ids, "av"), grid, per_config=True),
            "separate": lambda: [step(batch_features(store, ids, "av"), [r]) for r in grid],
        }
        times = {k: [] for k in cases}
        for f in cases.values():  # warm-up
            f()
        for _ in range(args.reps):  # interleaved
            for k, f in cases.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"Mid-size random model: Whisper-base-shaped encoder 512x6 (faithful: 30 s windows), "
        f"AV-HuBERT-shaped video encoder 512x6 "
        f"(ResNet 32 ch), Llama 512x8; {n_params / 1e6:.1f}M parameters in the AVSR model (LLM + trained parts); "
        f"batch {len(ids)} utterances, {seconds:.1f} s of speech, {n_tok} target tokens; 4 configurations "
        f"(4,2) (4,5) (16,2) (16,5).",
        "",
        "| case | s/step | steps/s | ratio |",
        "|---|---|---|---|",
        f"| cache (joint: 1 merged LLM pass) | {med['cache']:.3f} | {1 / med['cache']:.2f} | 1.00 |",
        f"| on the fly | {med['on the fly']:.3f} | {1 / med['on the fly']:.2f} | "
        f"cache is {med['on the fly'] / med['cache']:.1f}x faster |",
        f"| per_config (4 LLM passes, the default) | {med['per_config']:.3f} | {1 / med['per_config']:.2f} | "
        f"joint is {med['per_config'] / med['cache']:.2f}x faster |",
        f"| separate (sum of 4 single steps) | {med['separate']:.3f} | {1 / med['separate']:.2f} | "
        f"joint is {med['separate'] / med['cache']:.2f}x faster |",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"median of {args.reps} interleaved repetitions.",
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
