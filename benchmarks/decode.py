"""Decoding throughput: batched beam search vs one utterance at a time, and cost per configuration.

Uses a trained experiment of the synthetic recipe (`make demo` makes one) through mavsr's own
Decoder, on the cached test features:
  1. utterances/s at beam B for batch size 1 (the reference practice) and batched, interleaved,
     with a check that both give the same hypotheses;
  2. per trained configuration, LLM input tokens per utterance and batched decode time;
  3. LLM input tokens for a 10 s clip per configuration, next to docs/method.md Table 4.

    python benchmarks/decode.py [--dir recipes/synth] [--exp exp/synth_ms_all] [--beam 15] [--batch 32]
                                [--utts 32] [--reps 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import emit

import mavsr_cli  # noqa: F401  (torchaudio guard before transformers)
from mavsr_cli.decoding import Decoder, auto_max_new_tokens, generate
from mavsr_cli.features import batch_features
from mavsr_cli.rates import Rates
from mavsr_cli.recipe import Recipe

# docs/method.md, Table 4: LLM input tokens for a 10 s clip (Llama 3.1-8B setting)
PAPER_T4 = {"a1v1": 757, "a4v2": 257, "a4v5": 182, "a16v2": 163, "a16v5": 88}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1] / "recipes/synth")
    ap.add_argument("--exp", default="exp/synth_ms_all")
    ap.add_argument("--beam", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--utts", type=int, default=32, help="test utterances timed")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    recipe = Recipe(args.dir)
    if not (recipe.root / args.exp / "meta.json").is_file():
        sys.exit(f"no trained experiment at {recipe.root / args.exp}: run `make demo` first")
    dec = Decoder(recipe, args.exp, "test", log=lambda m: None)
    store = dec.store(dec.options())
    model = dec.model
    ids = [i for i in store.ids() if i in dec.utts][: args.utts]
    modality = dec.cfg.model.modality

    tok = model.tokenizer

    def hf_generate(feats, rates, mnt):  # the reference practice: transformers' beam search
        emb, mask, _ = model.build(feats, rates, None, left_pad=True)
        out = model.llm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=mnt, do_sample=False,
                                 num_beams=args.beam, early_stopping=True, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        return [" ".join(t.split()) for t in tok.batch_decode(out, skip_special_tokens=True)]

    def decode(rates: Rates, bs: int, hf: bool = False) -> tuple[list[str], float]:
        hyps = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(ids), bs):
                bid = ids[b:b + bs]
                mnt = auto_max_new_tokens([dec.utts[i].duration for i in bid])
                feats = batch_features(store, bid, modality)
                hyps += hf_generate(feats, rates, mnt) if hf else generate(model, feats, rates, mnt, beam=args.beam)[0]
        return hyps, time.perf_counter() - t0

    r0 = Rates(16, 5) if Rates(16, 5) in dec.trained else dec.trained[-1]
    cases = {"transformers generate, batch 1": (1, True),
             f"transformers generate, batch {args.batch}": (args.batch, True),
             "mavsr, batch 1": (1, False), f"mavsr, batch {args.batch}": (args.batch, False)}
    times = {c: [] for c in cases}
    outs = {}
    for _ in range(args.reps):  # interleaved
        for c, (bs, hf) in cases.items():
            outs[c], t = decode(r0, bs, hf)
            times[c].append(t)
    med = {c: statistics.median(v) for c, v in times.items()}
    ref = med["transformers generate, batch 1"]
    same = outs["mavsr, batch 1"] == outs[f"mavsr, batch {args.batch}"]
    agree = sum(a == b for a, b in zip(outs["mavsr, batch 1"], outs["transformers generate, batch 1"], strict=True))
    lines = [
        f"Experiment {args.exp} of {recipe.root.name} (strategy {dec.meta['strategy']}), {len(ids)} test utterances, "
        f"beam {args.beam}, rates {r0.tag}; median of {args.reps} interleaved runs.",
        "",
        "| beam search | s total | utterances/s | speed-up over the reference practice |",
        "|---|---|---|---|",
        *[f"| {c} | {t:.2f} | {len(ids) / t:.2f} | {ref / t:.1f}x |" for c, t in med.items()],
        "",
        f"mavsr hypotheses identical between batch size 1 and {args.batch}: {'yes' if same else 'NO'}. "
        f"mavsr and transformers agree on {agree} of {len(ids)} hypotheses (they can differ where "
        "candidates tie or where beams finish at different steps).",
        "",
        f"Per configuration (batch {args.batch}, beam {args.beam}, same utterances):",
        "",
        "| (A,V) | LLM input tokens/utt | tokens/s of speech | decode s/utt |",
        "|---|---|---|---|",
    ]
    seconds = sum(dec.utts[i].duration for i in ids)
    for r in dec.trained:
        with torch.inference_mode():
            n_in = model.build(batch_features(store, ids, modality), r, None, left_pad=True)[1].sum(1)
        _, t = decode(r, args.batch)
        lines.append(f"| {r.pair} | {n_in.float().mean():.1f} | {n_in.sum().item() / seconds:.1f} "
                     f"| {t / len(ids):.4f} |")
    # a 10 s clip: 500 audio frames at 50 Hz, 250 video frames at 25 Hz
    dims = dec.meta["dims"]
    clip = {}
    if "audio" in dims:
        clip["audio"] = (torch.zeros(1, 500, dims["audio"]), torch.tensor([500]))
    if "video" in dims:
        clip["video"] = (torch.zeros(1, 250, dims["video"]), torch.tensor([250]))
    fixed = 1 + len(model.prompt_ids) + 2 * len(clip)  # BOS, prompt, open/close markers
    lines += ["", "LLM input tokens for a 10 s clip (mavsr counts BOS, the markers and its prompt "
              f"tokens: {fixed} fixed tokens):", "",
              "| (A,V) | mavsr | mavsr / (4,2) | paper Table 4 | paper / (4,2) |", "|---|---|---|---|---|"]
    with torch.inference_mode():
        base = None
        for r in dec.trained:
            n = int(model.build(clip, r, None)[1].sum())
            base = base or n
            p = PAPER_T4.get(r.tag)
            lines.append(f"| {r.pair} | {n} | {n / base:.3f} | {p or '-'} | "
                         f"{(p / PAPER_T4['a4v2']) if p else float('nan'):.3f} |")
    lines += ["", f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
