"""Stage `tiny-models` (synthetic recipe only): small encoders and LLM, built from configs.

No pretrained encoders or LLM exist for the synthetic corpus, so this stage builds them and saves
each in its real on-disk format, to be loaded later through the same code as real models:
    writes models/whisper/   Whisper (WhisperConfig -> save_pretrained), frozen afterwards
           models/video/     the small lip encoder (config.json + model.safetensors)
                             both encoders first get a short character-CTC training on the train
                             split: random encoders carry almost nothing of their input (measured:
                             features of two different utterances differed by 2% of their spread),
                             and real ones arrive pretrained
           models/llm/       a small Llama + word-level tokenizer (save_pretrained), given a short
                             language-model warm-up on the training transcripts (design.md allows
                             it: a real Llama arrives knowing the language; ours has to learn it)
    reads  data/train/manifest.jsonl (the warm-up text)
The Matryoshka training afterwards keeps this LLM frozen and trains projectors + LoRA only.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from ..clocks import FPS
from ..config import VideoEncoderConfig
from ..datasets import synth
from ..datasets.lrs_text import parse_text
from ..errors import MavsrError
from ..fsutil import clean_stale, inside, sha256_file, staged_dir
from ..media import normalise, read_audio, read_mouth_roi, video_crop
from ..model import llm as llm_mod
from ..model.audio_encoder import WhisperAudioEncoder
from ..model.video_encoder import SmallVideoEncoder
from ..options import TinyOptions
from ..progress import bar, progress
from ..recipe import Recipe, done_inputs, done_text, finished, mark_done, write_provenance
from ..train_loop import lr_lambda


def warmup_sequence(tok, text: str, prompt: str, rng: np.random.Generator,
                    words: list[str] | None = None) -> tuple[list[int], list[int]]:
    """One warm-up example: (input ids, labels), the loss on the transcript and EOS only.

    A third of the examples are plain `[BOS] prompt text [EOS]`. The others put two stretched,
    noisy copies of a word sequence before the prompt (each word repeated 1-5 times, 10% of the
    tokens replaced at random), standing in for the audio and video token streams: a pretrained
    LLM can already read content from its context, and this teaches the small one the same skill
    from text. Half of those sequences are the transcript, half random words from `words`: only
    reading the context predicts a random sequence, so the skill cannot be replaced by the
    grammar (measured: with transcripts alone the warmed-up LLM's loss with two copies in context
    was 1.87 nats/word against 2.13 without; with random sequences too, 0.06).
    """
    r = rng.random()
    if r >= 2 / 3 and words:
        text = " ".join(words[i] for i in rng.integers(len(words), size=int(rng.integers(4, 12))))
    ids = tok(text, add_special_tokens=False).input_ids
    head = [tok.bos_token_id]
    if r >= 1 / 3:
        for _ in range(2):
            copy = [w for w in ids for _ in range(int(rng.integers(1, 6)))]
            noise = rng.random(len(copy)) < 0.1
            head += [int(rng.integers(len(tok))) if n else w for w, n in zip(copy, noise, strict=True)]
    head += tok(prompt, add_special_tokens=False).input_ids
    tail = ids + [tok.eos_token_id]
    return head + tail, [-100] * len(head) + tail


def lm_warmup(path: Path, texts: list[str], prompt: str, epochs: int, seed: int, log=print,
              words: list[str] | None = None) -> float:
    """Train the whole small LLM on the transcripts (see warmup_sequence), then save it.

    AdamW at 1e-3 with a linear warm-up (100 steps at most) and cosine decay, gradient norm
    clipped at 1: at 3e-3 without warm-up or clipping, the copying skill did not form."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    bs = 32
    steps = epochs * math.ceil(len(texts) / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup=min(100, steps // 10)))
    loss_v = float("nan")
    with bar() as pbar:
        task = pbar.add_task("LLM warm-up (next-word loss on transcripts)", total=steps, info="")
        for ep in range(epochs):
            order = torch.randperm(len(texts), generator=g).tolist()
            examples = [warmup_sequence(tok, texts[j], prompt, rng, words) for j in order]
            for batch in length_batches(examples, bs, g):
                ids, lab, mask = _padded(batch, tok.pad_token_id)
                loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                loss_v = loss.item()
                pbar.update(task, advance=1, info=f"epoch {ep + 1}/{epochs} loss {loss_v:.3f}")
    model.save_pretrained(path)
    log(f"tiny-models: LM warm-up done, final loss {loss_v:.3f}")
    return loss_v


def length_batches(examples: list, bs: int, g: torch.Generator, window: int = 8) -> list[list]:
    """Cut `examples` (in their order) into batches of `bs`, each window of `window` batches sorted
    by length first, then shuffle the batches: similar lengths share a batch, so padding is small
    (measured on the demo's warm-up: 1.87 tokens per real one in random batches, 1.13 here)."""
    batches = []
    for w in range(0, len(examples), bs * window):
        chunk = sorted(examples[w:w + bs * window], key=lambda e: len(e[0]))
        batches += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def _padded(batch: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(ids, labels)] -> input ids, labels and attention mask, (B, longest) each."""
    n = max(len(x) for x, _ in batch)
    ids = torch.full((len(batch), n), pad_id)
    lab = torch.full((len(batch), n), -100)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for k, (x, y) in enumerate(batch):
        ids[k, : len(x)] = torch.tensor(x)
        lab[k, : len(y)] = torch.tensor(y)
        mask[k, : len(x)] = 1
    return ids, lab, mask


CHARS = " abcdefghijklmnopqrstuvwxyz'"  # CTC targets; index 0 is the blank


def ctc_targets(texts: list[str], units: str, words: list[str]) -> tuple[list[torch.Tensor], int]:
    """CTC target sequences (index 0 is the blank) and the number of classes, blank included."""
    if units == "align":
        raise MavsrError("align targets are framewise: use frame_targets")
    if units == "char":
        return [torch.tensor([CHARS.index(c) + 1 for c in t if c in CHARS]) for t in texts], len(CHARS) + 1
    if units == "word":
        index = {w: i + 1 for i, w in enumerate(words)}
        return [torch.tensor([index[w] for w in t.split() if w in index]) for t in texts], len(words) + 1
    raise MavsrError(f"unknown CTC unit {units!r}: use word or char")


def frame_targets(timings: list[tuple[str, float, float]], hz: float, words: list[str]) -> torch.Tensor:
    """The word under each frame at `hz` (index 0: no word), from a `Text:` file's word table,
    as long as the last word's end. The encoder's output is cut or padded with 0 to match."""
    index = {w: i + 1 for i, w in enumerate(words)}
    n = max((int(round(e * hz)) for _, _, e in timings), default=0)
    y = torch.zeros(n, dtype=torch.long)
    for w, s, e in timings:
        y[int(round(s * hz)):int(round(e * hz))] = index.get(w.lower(), 0)
    return y


def ctc_pretrain(name: str, encoder: torch.nn.Module, encode_batch, inputs: list, targets: list[torch.Tensor],
                 classes: int, dim: int, epochs: int, seed: int, log=print, batch_size: int = 8,
                 lr: float = 2e-3, framewise: bool = False) -> float:
    """Train `encoder` with a linear head over `classes` units; `encode_batch(xs)` maps a list of
    inputs to ((B, T, dim) padded, lengths (B,)).

    The loss is CTC over target sequences, or, with `framewise`, cross-entropy against one target
    per output frame (index 0 there is "no word", not a blank)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(dim, classes)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(inputs) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup=0))
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    encoder.train()
    loss_v = float("nan")
    with bar() as pbar:
        objective = "word under each frame, cross-entropy" if framewise else "CTC"
        task = pbar.add_task(f"pretrain {name} encoder ({objective})", total=steps, info="")
        for ep in range(epochs):
            order = torch.randperm(len(inputs), generator=g).tolist()
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                x, lens = encode_batch([inputs[i] for i in idx])  # (B, T, dim), (B,)
                logp = head(x.transpose(0, 1)).log_softmax(-1)  # (T, B, classes)
                tg = [targets[i] for i in idx]
                if framewise:
                    y = torch.full(logp.shape[:2], -100, dtype=torch.long)  # (T, B)
                    for k, (t, n) in enumerate(zip(tg, lens.tolist(), strict=True)):
                        y[:n, k] = 0
                        y[:min(n, len(t)), k] = t[:n]
                    loss = torch.nn.functional.nll_loss(logp.flatten(0, 1), y.flatten())
                else:
                    loss = ctc(logp, torch.cat(tg), lens, torch.tensor([len(t) for t in tg]))
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                sched.step()
                loss_v = loss.item()
                pbar.update(task, advance=1, info=f"epoch {ep + 1}/{epochs} loss {loss_v:.3f}")
    encoder.eval().requires_grad_(False)
    log(f"tiny-models: {name} encoder {'framewise' if framewise else 'CTC'} pretraining done, final loss {loss_v:.3f}")
    return loss_v


def word_timings(recipe: Recipe, utt, source: Path | None) -> list[tuple[str, float, float]]:
    """The word table of an utterance's `Text:` file: beside its video, or, for media that
    `prepare` wrote under corpus/<name>/, at the same place under the source tree it read
    (`source`, the `root` recorded in data/<split>/config.yaml)."""
    video = recipe.resolve_media(utt.video)
    path = video.with_suffix(".txt")
    if not path.is_file() and source is not None and inside(video, recipe.root / "corpus"):
        rel = video.relative_to(recipe.root / "corpus")
        path = source.joinpath(*rel.parts[1:]).with_suffix(".txt")
    if not path.is_file():
        raise MavsrError(f"--ctc-units align needs word timings: {path} is missing")
    _, words = parse_text(path)
    if not words:
        raise MavsrError(f"--ctc-units align needs word timings: {path} has no word table")
    return words


def run(recipe: Recipe, opt: TinyOptions, force: bool = False, log=print) -> Path:
    """Build the three models into models/{whisper,video,llm}/. Each part is saved (with a `.done`
    naming its inputs) as soon as it is finished, so an interrupted run resumes after it."""
    out = recipe.root / "models"
    inputs = {**opt.__dict__, "train_manifest": sha256_file(recipe.require_manifest("train"))}
    if not force and finished(out, inputs, f"tiny-models: {out}", log):
        return out
    if force and out.exists():
        shutil.rmtree(out)
    clean_stale(out)
    utts = recipe.utterances("train")
    texts = [u.text for u in utts]
    prompts = "transcribe speech and video to text ."  # every word of the paper's three prompts
    words = synth.vocabulary() + sorted({w for t in texts for w in t.split()}) + prompts.split()
    pretrain_audio, pretrain_video = _pretrainers(recipe, opt, utts, texts, sorted(set(words)), log)
    n = opt.encoder_epochs
    parts = {
        "whisper": lambda d: WhisperAudioEncoder.tiny(d, d_model=opt.audio_dim, layers=opt.audio_layers,
                                                      seed=opt.seed, pretrain=pretrain_audio if n > 0 else None),
        "video": lambda d: SmallVideoEncoder.tiny(d, seed=opt.seed + 1, dim=opt.video_dim, layers=opt.video_layers,
                                                  pretrain=pretrain_video if opt.lip_epochs > 0 else None),
        "llm": lambda d: _llm(d, opt, words, texts, log),
    }
    for name, build in parts.items():
        part = out / name
        if done_inputs(part) == inputs:
            log(f"tiny-models: {name} kept from an earlier run")
            continue
        with staged_dir(part, done_text(inputs)) as tmp:
            build(tmp)
    write_provenance(out, yaml.safe_dump(opt.__dict__, sort_keys=False))
    mark_done(out, inputs)
    log(f"tiny-models: wrote {out}")
    return out


def _llm(d: Path, opt: TinyOptions, words: list[str], texts: list[str], log) -> None:
    llm_mod.tiny(d, words, hidden=opt.llm_hidden, layers=opt.llm_layers, seed=opt.seed + 2)
    if opt.lm_epochs > 0:
        lm_warmup(d, texts, opt.prompt, opt.lm_epochs, opt.seed, log=log, words=synth.vocabulary())


def _pretrainers(recipe: Recipe, opt: TinyOptions, utts: list, texts: list[str], vocab: list[str], log):
    """The encoders' pretraining functions (each called on a freshly built encoder), their targets
    the transcripts' characters or words (CTC) or the word under each frame (`align`)."""
    framewise = opt.ctc_units == "align"
    if framewise:
        settings = yaml.safe_load((recipe.data("train") / "config.yaml").read_text()) \
            if (recipe.data("train") / "config.yaml").is_file() else {}
        source = Path(settings["root"]) if isinstance(settings, dict) and settings.get("root") else None
        timings = [word_timings(recipe, u, source) for u in utts]
        classes = len(vocab) + 1
        targets = {hz: [frame_targets(t, hz, vocab) for t in timings] for hz in (50, FPS)}
    else:
        tg, classes = ctc_targets(texts, opt.ctc_units, vocab)
        targets = {50: tg, FPS: tg}
    n = opt.encoder_epochs

    def pretrain_audio(enc):
        mels = [enc.mel(read_audio(recipe.resolve_media(u.audio))) for u in progress(utts, "log-mel")]
        ctc_pretrain("audio", enc.encoder, enc.encode_mels, mels, targets[50], classes, opt.audio_dim, n, opt.seed,
                     log, framewise=framewise)

    def pretrain_video(enc):
        vc = VideoEncoderConfig()
        crops = [video_crop(read_mouth_roi(recipe.resolve_media(u.video), vc.fps, u.num_frames, u.id), vc.crop)
                 for u in progress(utts, "mouth crops")]
        def encode_batch(batch):  # one clip at a time: the conv stem's batch norm sees one utterance
            outs = [enc(normalise(c, vc.mean, vc.std)) for c in batch]  # (T_b, dim) each
            return torch.nn.utils.rnn.pad_sequence(outs, batch_first=True), torch.tensor([len(o) for o in outs])

        ctc_pretrain("video", enc, encode_batch, crops, targets[FPS], classes, opt.video_dim, opt.lip_epochs,
                     opt.seed, log, framewise=framewise)

    return pretrain_audio, pretrain_video
