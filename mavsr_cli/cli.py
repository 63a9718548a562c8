"""The `mavsr` command line: parse options, then call one stage function. No logic here."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import MavsrError

app = typer.Typer(
    name="mavsr",
    help="Adaptive audio-visual speech recognition with Matryoshka multimodal LLMs. "
    "Stages read and write files in a recipe directory: prepare -> extract-features -> train -> "
    "decode -> score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)  # log lines are never folded (they get grepped)
err = Console(stderr=True, soft_wrap=True)

DirOpt = Annotated[Path, typer.Option("--dir", "-d", help="Recipe directory holding data/, dump/, exp/.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (e.g. conf/synth.yaml); defaults otherwise.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo work even if its .done marker exists.")]


def _log(msg: str) -> None:
    out.print(msg, highlight=False, markup=False)


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _recipe(d: Path, *writes: str | Path):
    """The recipe dir; `writes` (relative to it, or absolute) are output dirs checked for being
    writable before any work starts, so a read-only or full disk fails at once, in one line."""
    from .fsutil import check_writable
    from .recipe import Recipe

    if not d.is_dir():
        raise MavsrError(f"recipe directory not found: {d}")
    recipe = Recipe(d)
    for w in writes:
        check_writable(recipe.root / w)
    return recipe


@app.command()
def prepare(
    corpus: Annotated[str, typer.Argument(help="Corpus to prepare: synth (generated), lrs3 or lrs2 (official trees, --root), dir (any folder of videos with a .txt transcript beside each, --root), csv (an LLM-AVSR label list, --csv and --root).")],
    dir: DirOpt = Path("."),
    root: Annotated[Path | None, typer.Option(help="lrs3/lrs2: the corpus as distributed (e.g. the dir holding pretrain/, trainval/, test/).")] = None,
    landmarks: Annotated[Path | None, typer.Option(help="lrs3/lrs2: dir of 68-point landmark pickles at the videos' relative paths (default: .pkl beside each video).")] = None,
    mean_face: Annotated[Path | None, typer.Option(help="lrs3/lrs2: reference face (68 x 2, .npy or text) for the mouth alignment (default: mavsr's template).")] = None,
    max_seconds: Annotated[float, typer.Option(help="lrs3/lrs2: cut pretrain utterances into segments of at most this many seconds, on word boundaries.")] = 16.0,
    shard: Annotated[str | None, typer.Option(help="lrs3/lrs2/dir: i/N, process only this worker's share; run again without it to merge.")] = None,
    split: Annotated[str, typer.Option(help="dir/csv: the split the data becomes (data/<split>/).")] = "train",
    csv: Annotated[Path | None, typer.Option(help="csv: the label list (dataset,relative_path,frames,token_ids,text); --root is its data root.")] = None,
    num_utts: Annotated[int, typer.Option(help="synth: utterances in the train split.")] = 400,
    test_utts: Annotated[int, typer.Option(help="synth: utterances in the test split.")] = 60,
    speakers: Annotated[int, typer.Option(help="synth: number of speakers (voice + face).")] = 4,
    heldout_speakers: Annotated[int, typer.Option(help="synth: speakers used only in test (0 = test uses all).")] = 0,
    seed: Annotated[int, typer.Option(help="synth: random seed; the corpus is a function of it.")] = 0,
    words_per_slot: Annotated[int, typer.Option(help="synth: draw each grammar slot (name, noun, ...) from its first N words only, a smaller vocabulary (0 = all, about 300 words).")] = 0,
    nj: Annotated[int, typer.Option(help="Worker processes for synthesis and media checks.")] = min(4, os.cpu_count() or 1),
    force: ForceOpt = False,
) -> None:
    """Turn a corpus into data/<split>/manifest.jsonl (synth: generate it first under corpus/synth/;
    lrs3/lrs2: mouth-ROI media from the official tree and its landmarks under corpus/<corpus>/)."""
    from .stages import prepare as stage
    from .stages.extract_features import parse_shard

    recipe = _recipe(dir, "data", "corpus")
    if corpus == "csv":
        if csv is None or root is None:
            raise MavsrError("prepare csv needs --csv (the label list) and --root (its data root)")
        stage.run_csv(recipe, csv, root, split, force, _log)
        return
    if corpus in ("lrs3", "lrs2", "dir"):
        if root is None:
            raise MavsrError(f"prepare {corpus} needs --root (the corpus folder)")
        opt = stage.LrsOptions(root, landmarks, mean_face, max_seconds, nj, parse_shard(shard), split)
        stage.run_lrs(recipe, corpus, opt, force, _log)
        return
    if corpus != "synth":
        raise MavsrError(f"unknown corpus {corpus!r} (available: synth, lrs3, lrs2, dir, csv)")
    stage.run_synth(recipe, stage.SynthOptions(num_utts, test_utts, speakers, heldout_speakers, seed, words_per_slot, nj), force, _log)


@app.command("tiny-models")
def tiny_models(
    dir: DirOpt = Path("."),
    audio_dim: Annotated[int, typer.Option(help="Whisper encoder width.")] = 128,
    audio_layers: Annotated[int, typer.Option(help="Whisper encoder layers.")] = 2,
    video_dim: Annotated[int, typer.Option(help="Lip encoder width.")] = 128,
    video_layers: Annotated[int, typer.Option(help="Lip encoder transformer layers.")] = 2,
    llm_hidden: Annotated[int, typer.Option(help="Llama hidden size.")] = 192,
    llm_layers: Annotated[int, typer.Option(help="Llama layers.")] = 2,
    lm_epochs: Annotated[int, typer.Option(help="Language-model warm-up epochs on the train transcripts (0 = none).")] = 8,
    encoder_epochs: Annotated[int, typer.Option(help="Pretraining epochs of each encoder (0 = keep random).")] = 6,
    ctc_units: Annotated[str, typer.Option(help="Encoder pretraining targets: char or word (CTC over the transcript), or align (the word under each frame, from the Text: files' word timings).")] = "char",
    seed: Annotated[int, typer.Option(help="Random seed for the initial weights.")] = 0,
    force: ForceOpt = False,
) -> None:
    """Synthetic recipe only: build small Whisper, lip encoder and Llama into models/ (real on-disk formats)."""
    _quiet_libraries()
    from .stages import tiny_models as stage

    opt = stage.TinyOptions(audio_dim, audio_layers, video_dim, video_layers, llm_hidden, llm_layers, lm_epochs,
                            encoder_epochs, seed=seed, ctc_units=ctc_units)
    stage.run(_recipe(dir, "models"), opt, force, _log)


@app.command("extract-features")
def extract_features(
    dir: DirOpt = Path("."),
    config: ConfigOpt = None,
    split: Annotated[list[str], typer.Option("--split", "-s", help="Split(s) to extract; repeat the option for several.")] = ["train", "test"],
    shard: Annotated[str | None, typer.Option(help="i/N: compute only this worker's share of the shard files (N workers, one dump dir); run again without it to merge.")] = None,
    shard_size: Annotated[int, typer.Option(help="Utterances per shard file.")] = 256,
    modality: Annotated[str | None, typer.Option(help="Overriding the config: av, a (audio encoder only) or v (video encoder only), as `train --modality` will read it.")] = None,
    force: ForceOpt = False,
) -> None:
    """Run the frozen encoders once and cache native-rate features in dump/<encoders>/<split>/."""
    _quiet_libraries()
    from . import config as C
    from .stages import extract_features as stage

    cfg = C.load(config)
    if modality is not None:
        cfg = C.with_modality(cfg, modality)
    stage.run(_recipe(dir, "dump"), cfg, split, force, _log, stage.parse_shard(shard), shard_size)


@app.command()
def train(
    dir: DirOpt = Path("."),
    config: ConfigOpt = None,
    rates: Annotated[str, typer.Option(help="'all' = every configuration of the config's grid, or tags like a4v2,a16v5.")] = "all",
    lora: Annotated[str | None, typer.Option(help="LoRA strategy, overriding the config: ms (shared), ss (one per configuration), mss (both).")] = None,
    modality: Annotated[str | None, typer.Option(help="Overriding the config: av (AVSR), a (audio only, ASR), v (video only, VSR); needs a cache extracted for it.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs, overriding train.epochs of the config.")] = None,
    tag: Annotated[str | None, typer.Option(help="Experiment name under exp/ (default: <config>_<lora>_<rates>).")] = None,
    force: ForceOpt = False,
) -> None:
    """Matryoshka training of projectors + LoRA over the frozen LLM; writes exp/<tag>/.

    An interrupted run resumes from its last checkpoint when started again with the same
    arguments (exactly: same batches, same losses). Under `torchrun --nproc_per_node N` the same
    command trains with N DDP processes (train.distributed: fsdp to shard instead)."""
    _quiet_libraries()
    from . import config as C
    from .stages import train as stage

    cfg = C.load(config)
    if lora is not None:
        cfg = C.with_lora_strategy(cfg, lora)
    if modality is not None:
        cfg = C.with_modality(cfg, modality)
    if epochs is not None:
        cfg = C.with_epochs(cfg, epochs)
    tag = tag or stage.default_tag(str(config) if config else None, cfg.model.lora.strategy, rates,
                                   None if modality is None else cfg.model.modality)
    stage.run(_recipe(dir, "exp"), cfg, rates, tag, force, _log)


@app.command()
def decode(
    exp: Annotated[Path, typer.Option(help="Experiment dir (exp/<tag>), relative to --dir or absolute.")],
    dir: DirOpt = Path("."),
    split: Annotated[str, typer.Option(help="Split to decode.")] = "test",
    audio_rate: Annotated[int | None, typer.Option(help="Audio compression rate (must be in the trained grid).")] = None,
    video_rate: Annotated[int | None, typer.Option(help="Video compression rate (must be in the trained grid).")] = None,
    sweep: Annotated[bool, typer.Option(help="Decode every trained configuration in one call (the model loads once).")] = False,
    budget: Annotated[float | None, typer.Option(help="LLM input tokens per second of speech: decode the most accurate trained configuration that fits.")] = None,
    beam: Annotated[int, typer.Option(help="Beam width (1 = greedy). Never sampling.")] = 15,
    batch_size: Annotated[int | None, typer.Option(help="Utterances decoded together (default: config); the hypotheses do not depend on it.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest transcript generated (default: 8 per second of speech, at least 32).")] = None,
    snr: Annotated[float | None, typer.Option(help="Add noise to the audio at this SNR in dB (seeded per utterance; encoded once into its own cache).")] = None,
    noise: Annotated[str, typer.Option(help="Noise for --snr: babble (other training speakers), white, or an audio file.")] = "babble",
    shard: Annotated[str | None, typer.Option(help="i/N: decode only this worker's share into a part file; run again without it to merge.")] = None,
    pool_rates: Annotated[str | None, typer.Option(help="Inference-only pooling (the paper's baseline), e.g. a16v5: pool the features at these rates but use the projectors of --audio-rate/--video-rate (say a model trained at rate 1). Average-pooling models only.")] = None,
    force: ForceOpt = False,
) -> None:
    """Decode a split at one rate pair (or --sweep, --budget) into exp/<tag>/decode_<rates>_beam<B>[_snr<X>]/<split>/."""
    _quiet_libraries()
    from .stages import decode as stage
    from .stages.extract_features import parse_shard

    stage.run(_recipe(dir, exp), exp, split, audio_rate, video_rate, batch_size, max_new_tokens, force, _log,
              beam=beam, snr=snr, noise=noise, shard=parse_shard(shard), sweep=sweep, budget=budget, pool=pool_rates)


@app.command()
def transcribe(
    media: Annotated[Path, typer.Argument(help="Video (or audio) file in any container PyAV reads.")],
    exp: Annotated[Path, typer.Option(help="Experiment dir (exp/<tag>), relative to --dir or absolute.")],
    dir: DirOpt = Path("."),
    audio_rate: Annotated[int | None, typer.Option(help="Audio compression rate (default: the least compressed trained configuration).")] = None,
    video_rate: Annotated[int | None, typer.Option(help="Video compression rate (must be in the trained grid).")] = None,
    budget: Annotated[float | None, typer.Option(help="LLM input tokens per second of speech: the most accurate trained configuration that fits.")] = None,
    roi: Annotated[str | None, typer.Option(help="Mouth region x,y,w,h in pixels (default: the whole frame, for videos that are a mouth crop).")] = None,
    modality: Annotated[str | None, typer.Option(help="av, a or v; must be the experiment's (default: the experiment's).")] = None,
    beam: Annotated[int, typer.Option(help="Beam width (1 = greedy).")] = 15,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest transcript (default: 8 per second, at least 32).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON record with rates, tokens and timings instead of the text.")] = False,
) -> None:
    """Transcribe one media file with a trained experiment (encoders run on the fly)."""
    _quiet_libraries()
    import json

    from .stages import transcribe as stage

    res = stage.run(_recipe(dir), exp, media, audio_rate, video_rate, budget, roi, modality, beam, max_new_tokens)
    if json_out:
        out.print(json.dumps(res, ensure_ascii=False), highlight=False, markup=False)
    else:
        out.print(res["text"], highlight=False, markup=False)


@app.command()
def bench(
    exp: Annotated[list[Path], typer.Option(help="Experiment dir(s) (exp/<tag>); repeat the option to compare several (e.g. AV, audio-only, video-only, baselines).")],
    dir: DirOpt = Path("."),
    split: Annotated[str, typer.Option(help="Split to decode.")] = "test",
    snr: Annotated[str, typer.Option(help="Conditions, comma-separated: clean and babble SNRs in dB.")] = "clean,10,5,0,-5",
    noise: Annotated[str, typer.Option(help="Noise for the SNR conditions: babble, white, or an audio file.")] = "babble",
    beam: Annotated[int, typer.Option(help="Beam width (1 = greedy).")] = 15,
    batch_size: Annotated[int | None, typer.Option(help="Utterances decoded together (default: config).")] = None,
    out: Annotated[Path | None, typer.Option(help="Report dir (default: exp/<tag>/bench for one experiment, bench/ for several).")] = None,
) -> None:
    """Elastic-inference report: every trained rate pair x modality x noise condition decoded in one run, with WER, LLM tokens/s, latency, RTF and peak memory (CSV, JSON, REPORT.md, PNG plots)."""
    _quiet_libraries()
    from .stages import bench as stage

    opt = stage.BenchOptions(split=split, snrs=stage.parse_snrs(snr), noise=noise, beam=beam, batch_size=batch_size)
    if beam < 1:
        raise MavsrError("--beam must be at least 1")
    stage.run(_recipe(dir, *exp), exp, opt, out, _log)


@app.command()
def claims(
    bench: Annotated[Path, typer.Option(help="bench.json (or its dir) of `mavsr bench` over the Matryoshka, audio-only and video-only experiments.")],
    matryoshka: Annotated[list[Path], typer.Option(help="Matryoshka experiment(s): the first is the one in the bench; repeat for other LoRA strategies (checked from their decode dirs).")],
    baseline: Annotated[list[Path] | None, typer.Option(help="Per-rate baseline experiment (one trained configuration each); repeat for each.")] = None,
    rate1: Annotated[Path | None, typer.Option(help="Experiment trained at rate 1, decoded with --pool-rates at the Matryoshka grid's pairs.")] = None,
    audio_only: Annotated[Path | None, typer.Option(help="Audio-only experiment (in the bench).")] = None,
    video_only: Annotated[Path | None, typer.Option(help="Video-only experiment (in the bench).")] = None,
    dir: DirOpt = Path("."),
    split: Annotated[str, typer.Option(help="Split the decode dirs were made for.")] = "test",
    margin: Annotated[float, typer.Option(help="Claim 1: Matryoshka WER at most this many points above the baseline.")] = 1.5,
    target_best: Annotated[float, typer.Option(help="Target: clean WER below this at the least compressed pair.")] = 10.0,
    target_worst: Annotated[float, typer.Option(help="Target: clean WER below this at the most compressed pair.")] = 20.0,
    gentle: Annotated[float, typer.Option(help="Claim 2: WER rise from the least to the most compressed pair at most this.")] = 10.0,
    collapse: Annotated[float, typer.Option(help="Claim 2: the pooled rate-1 model at least this many points worse at the most compressed pair.")] = 10.0,
    av_slack: Annotated[float, typer.Option(help="Claim 3: AV WER must be below audio-only's plus this (0: strictly lower).")] = 0.0,
    video_max: Annotated[float, typer.Option(help="Claim 3: video-only WER below this.")] = 80.0,
    linear_tol: Annotated[float, typer.Option(help="Claim 4: media tokens within this fraction of the rate-proportional count.")] = 0.1,
    out: Annotated[Path | None, typer.Option(help="Where CLAIMS.md and claims.json go (default: beside bench.json).")] = None,
    strict: Annotated[bool, typer.Option(help="Exit 1 when a claim or target fails.")] = False,
) -> None:
    """Check the paper's four claims (and the accuracy targets) on a finished study: a verdict per claim with the numbers behind it (CLAIMS.md, claims.json). Decodes nothing."""
    from .stages import claims as stage

    bounds = stage.Bounds(margin=margin, target_best=target_best, target_worst=target_worst, gentle=gentle,
                          collapse=collapse, av_slack=av_slack, video_max=video_max, linear_tol=linear_tol)
    res = stage.run(_recipe(dir), bench, matryoshka, baseline or [], rate1, audio_only, video_only, bounds, out,
                    split, _log)
    if strict and not all(c.holds for c in res):
        raise typer.Exit(1)


@app.command()
def score(
    exp: Annotated[Path, typer.Option(help="Experiment dir (exp/<tag>), relative to --dir or absolute.")],
    dir: DirOpt = Path("."),
    normaliser: Annotated[str, typer.Option(help="Text normaliser for ref and hyp alike: default (lower-case, no punctuation but apostrophes) or none.")] = "default",
    force: ForceOpt = False,
) -> None:
    """Score every finished decode dir of an experiment (wer.json, result.txt, errors.txt, ref/hyp.trn) and write exp/<tag>/RESULTS.md."""
    from .stages import score as stage

    stage.run(_recipe(dir, exp), exp, force, _log, normaliser=normaliser)


@app.command()
def info(
    grid: Annotated[Path | None, typer.Option(help="Print only the rate tags of this config's grid, one per line (for scripts).")] = None,
) -> None:
    """Print versions of mavsr and its libraries, torchaudio's status and the available devices."""
    import platform

    if grid is not None:
        from . import config as C

        for r in C.load(grid).model.rate_grid():
            out.print(r.tag, highlight=False, markup=False)
        return

    import torch

    from . import __version__, compat

    _quiet_libraries()
    import av
    import peft
    import transformers

    _log(f"mavsr {__version__}, Python {platform.python_version()} on {platform.machine()}")
    _log(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, PyAV {av.__version__}")
    _log("torchaudio: " + ("usable" if compat.TORCHAUDIO is not None else f"not used ({compat.TORCHAUDIO_ERROR})"))
    cuda = torch.cuda.is_available()
    _log(f"devices: cpu ({os.cpu_count()} cores)" + (f", cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if cuda else ""))


def main() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    try:
        app()
    except SystemExit:
        if _signalled is None:
            raise
        _interrupted(_signalled)
    except BaseException as e:
        from rich.markup import escape

        if _signalled is not None or isinstance(e, (KeyboardInterrupt, Interrupted)):
            # a signal can surface as another exception when it lands inside a C extension
            _interrupted(_signalled or signal.SIGINT)
        if isinstance(e, MavsrError):
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            sys.exit(e.exit_code)
        if _resource_error(e):
            # disk full, read-only or permission errors met mid-stage: every output is written to a
            # temporary name and renamed, so what was finished before is intact
            why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
            where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
            err.print(f"[bold red]error:[/] {escape(why)}{escape(where)}; finished work is kept, "
                      "free space or fix permissions and rerun the same command", highlight=False)
            sys.exit(2)
        raise


def _interrupted(signum: int) -> None:
    sig = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    err.print(f"[bold red]interrupted[/] ({sig}): finished work is kept; rerun the same command to resume")
    sys.exit(143 if sig == "SIGTERM" else 130)


def _resource_error(e: BaseException) -> bool:
    """Disk full / read-only / permission, as an OSError or as the message of a library's own error
    (safetensors and torch.save report a full disk in their own exception types)."""
    if isinstance(e, OSError) and e.errno in _RESOURCE_ERRNOS:
        return True
    return any(m in str(e) for m in ("No space left on device", "Read-only file system", "Disk quota exceeded"))


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop, `kill`, torchrun shutting workers down) as an
    exception: temporary outputs are removed on the way out, finished ones kept. (Not
    KeyboardInterrupt, which Typer turns into a silent exit.)"""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_signalled: int | None = None


def _on_signal(signum, frame):
    global _signalled
    if _signalled is None:  # the first signal interrupts; more of them do not disturb the clean-up
        _signalled = signum
        raise Interrupted(signum)


_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


if __name__ == "__main__":
    main()
