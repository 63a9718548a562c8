"""The `mavsr` command line: parse options, then call one stage function. No logic here.

Defaults come from the option dataclasses (options.py) and the config (config.py), never restated;
the process around a command (signals, one-line errors, exit codes) is lifecycle.py's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from . import lifecycle
from .config import DecodeConfig, Modality, Strategy
from .errors import MavsrError
from .options import (
    DEVICE,
    DEVICE_ENV,
    LANDMARKS,
    MOUTH_CROP,
    MOUTH_CROP_MAX_SIDE,
    SERVE_MAX_BEAM,
    SHARD_SIZE,
    BenchOptions,
    Bounds,
    CtcUnits,
    LrsOptions,
    Normaliser,
    ServeOptions,
    SynthOptions,
    TinyOptions,
    default_jobs,
)
from .sharding import parse_shard

STAGE_ORDER = ("prepare", "tiny-models", "extract-features", "train", "import", "decode", "score", "transcribe",
               "serve", "bench", "claims", "info")


class _Flags:
    """Flags show no value placeholder in --help (`--force`, not `--force <bool>`, which reads as if
    `--force true` were accepted)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class _Command(_Flags, TyperCommand):
    pass


EXAMPLES = {  # shown under each command's --help; the synthetic recipe's commands (recipes/synth/run.sh)
    "prepare synth": ["mavsr prepare synth --num-utts 360 --test-utts 100 --words-per-slot 5   # the demo's "
                      "corpus (recipes/synth/run.sh)",
                      "mavsr prepare synth --num-utts 16 --test-utts 4 --speakers 2   # a minute's smoke test"],
    "prepare lrs3": ["mavsr prepare lrs3 --root /data/LRS3 --landmarks /data/LRS3_landmarks --nj 8"],
    "prepare lrs2": ["mavsr prepare lrs2 --root /data/LRS2 --landmarks /data/LRS2_landmarks --nj 8"],
    "prepare dir": ["mavsr prepare dir --root my_videos --split dev   # .mp4 + .txt (+ .pkl landmarks) each",
                    "mavsr prepare dir --root my_crops --split dev --mouth-crops   # videos that are mouth crops"],
    "prepare csv": ["mavsr prepare csv --csv lrs3_test.csv --root /data/preprocessed --split test"],
    "tiny-models": ["mavsr tiny-models --ctc-units align --encoder-epochs 12 --video-epochs 3 --lm-epochs 32"
                    "   # as run.sh"],
    "extract-features": ["mavsr extract-features --config conf/synth.yaml",
                         "mavsr extract-features --config conf/synth.yaml --shard 0/4   # one of 4 workers"],
    "train": ["mavsr train --config conf/synth.yaml --rates all --tag synth_ms_all",
              "torchrun --nproc_per_node 4 -m mavsr_cli train --config conf/avsr_ms.yaml --rates all   # recipes/lrs3"],
    "decode": ["mavsr decode --exp exp/synth_ms_all --audio-rate 16 --video-rate 5",
               "mavsr decode --exp exp/synth_ms_all --sweep --snr 0   # every pair, 0 dB babble",
               "mavsr decode --exp exp/synth_ms_all --budget 25   # the best pair within 25 tokens/s"],
    "import omni-avsr": ["mavsr import omni-avsr model_avg_1.pth --exp exp/mtsk --llm meta-llama/Llama-3.2-1B "
                         "--audio-encoder openai/whisper-medium.en --video-encoder models/large_vox_iter5.pt "
                         "--audio-rates 4,16 --video-rates 2,5",
                         "mavsr extract-features --config exp/mtsk/config.yaml --split test "
                         "&& mavsr decode --exp exp/mtsk --sweep"],
    "import llama-avsr": ["mavsr import llama-avsr ASR_Whisper-M_Llama3.1-8B_down3.pth --exp exp/lavsr_asr "
                          "--llm meta-llama/Llama-3.1-8B --audio-encoder openai/whisper-medium.en"],
    "score": ["mavsr score --exp exp/synth_ms_all && cat exp/synth_ms_all/RESULTS.md"],
    "transcribe": ["mavsr transcribe phone.mp4 --exp exp/synth_ms_all --save-roi mouth.mp4   # face found for you",
                   "mavsr transcribe clip.mp4 --exp exp/synth_ms_all --roi 210,300,120,120",
                   "mavsr transcribe mouth.mp4 --exp exp/synth_ms_all --budget 15 --json"],
    "serve": ["mavsr serve --exp exp/synth_ms_all   # http://127.0.0.1:8000, the elastic controller on",
              "curl -F file=@clip.mp4 http://127.0.0.1:8000/v1/audio/transcriptions",
              "mavsr serve --exp exp/synth_ms_all --exp exp/synth_a_ms_all --port 9000   # AV and audio-only",
              "mavsr serve --exp exp/synth_ms_all --rates a4v2 --api-key \"$KEY\" --host 0.0.0.0"],
    "bench": ["mavsr bench --exp exp/synth_ms_all --snr clean,10,0,-5",
              "mavsr bench --exp exp/synth_ms_all --exp exp/synth_a_ms_all --out bench/"],
    "claims": ["mavsr claims --bench exp/t/bench --matryoshka exp/t   # one experiment: the claims it can check",
               "mavsr claims --bench exp/bench --matryoshka exp/ms --baseline exp/base_a4v2 --baseline exp/base_a16v5 "
               "--rate1 exp/rate1 --audio-only exp/audio --video-only exp/video   # recipes/synth/study.sh, stage 7"],
    "info": ["mavsr info", "mavsr info --grid conf/synth.yaml   # the rate tags, for scripts"],
}


def _examples(name: str) -> str:
    return "Examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[name])


def _version(value: bool) -> None:
    if value:
        from . import __version__

        _log(f"mavsr {__version__}")
        raise typer.Exit()


class _Stages(_Flags, TyperGroup):
    """`mavsr --help` lists the commands in the order a recipe runs them."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER))


app = typer.Typer(
    cls=_Stages,
    name="mavsr",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", "-V", is_eager=True, callback=_version,
                                                help="Print mavsr's version and exit.")] = False) -> None:
    """Adaptive audio-visual speech recognition with Matryoshka multimodal LLMs. Stages read and write
    files in a recipe directory: prepare -> tiny-models (synthetic recipe) -> extract-features ->
    train -> decode -> score; then transcribe, bench, claims."""

DirOpt = Annotated[Path, typer.Option("--dir", "-d", help="Recipe directory holding data/, dump/, exp/.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c",
                                                help="YAML config (e.g. conf/synth.yaml), relative to the current "
                                                     "dir or else to --dir; defaults otherwise.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo work even if its .done marker exists.")]
ExpOpt = Annotated[Path, typer.Option(help="Experiment dir (exp/<tag>), relative to --dir or absolute.")]
ShardOpt = Annotated[str | None, typer.Option(help="i/N: do only this worker's share; run again without it to merge.")]
JobsOpt = Annotated[int, typer.Option(min=1, help="Worker processes for synthesis and media checks.")]
ModalityOpt = Annotated[Modality | None, typer.Option(help="Overriding the config: av (AVSR), a (audio only, ASR), "
                                                      "v (video only, VSR).")]
BeamOpt = Annotated[int | None, typer.Option(help=f"Beam width (1 = greedy); never sampling. Default: the config's "
                                             f"decode.beam ({DecodeConfig.beam}).")]
MaxTokensOpt = Annotated[int | None, typer.Option(help="Longest transcript generated. Default: the config's "
                                                  "decode.max_new_tokens (0 = 8 per second of speech, at least 32).")]
DeviceOpt = Annotated[str, typer.Option(envvar=DEVICE_ENV, show_envvar=True,
                                        help="Where the model runs, and the encoders when they run on the fly: auto "
                                        "(a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N. On a GPU "
                                        "the frozen LLM is held in bf16 when training would run there in bf16.")]
NoiseOpt = Annotated[str | None, typer.Option(help="Noise for --snr: babble (other training speakers), white, "
                                              f"or an audio file. Default: the config's decode.noise "
                                              f"({DecodeConfig.noise}).")]

SYNTH, LRS, TINY, BENCH, BOUNDS = SynthOptions(), LrsOptions(Path(".")), TinyOptions(), BenchOptions(), Bounds()
SERVE = ServeOptions()


def _log(msg: str) -> None:
    # plain print: while a progress bar is live, rich puts sys.stdout behind a proxy that prints the
    # line above the bar; a second rich Console would write past the proxy and glue onto the bar
    print(msg, flush=True)


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


def _config_path(config: Path | None, recipe_dir: Path) -> Path | None:
    """--config as given where it names a file from here; else the recipe dir's file of that name (a
    recipe's conf/ lives there, and --exp and the config's own paths are read from there too)."""
    if config is None or config.is_absolute() or config.is_file() or not (recipe_dir / config).is_file():
        return config
    return recipe_dir / config


def _next(d: Path, *commands: str) -> None:
    """A stage's last line: the recipe's next command(s), with this call's --dir `d` when it is not the
    current dir (so the line runs as printed, from here)."""
    if d.resolve() != Path.cwd().resolve():
        commands = tuple(c.replace("   #", f" --dir {d}   #", 1) if "   #" in c else f"{c} --dir {d}" for c in commands)
    _log("next: " + "   or   ".join(commands))


def _value(choice):
    return None if choice is None else choice.value


# ---- prepare: one command per corpus ----------------------------------------------------------
class _Corpora(_Flags, TyperGroup):
    """`mavsr prepare <corpus>` (and `mavsr import <flavour>`): an unknown one is refused naming the
    ones there are."""

    def resolve_command(self, ctx, args: list[str]):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            what = "checkpoint flavour" if ctx.info_name == "import" else "corpus"
            raise MavsrError(f"unknown {what} {args[0]!r} (available: {', '.join(self.commands)})")
        return super().resolve_command(ctx, args)


prepare_app = typer.Typer(cls=_Corpora, no_args_is_help=True, help="Turn a corpus into data/<split>/manifest.jsonl: "
                          "synth (generated), lrs3 and lrs2 (official trees), dir (any folder of videos), "
                          "csv (an LLM-AVSR label list).")
app.add_typer(prepare_app, name="prepare")

RootOpt = Annotated[Path | None, typer.Option(help="The corpus as distributed (e.g. the dir holding pretrain/, "
                                              "trainval/, test/).")]
LandmarksOpt = Annotated[Path | None, typer.Option(help="Dir of landmark pickles at the videos' relative paths "
                                                   f"(default: a .pkl beside each video); each is {LANDMARKS}. "
                                                   "A video without one goes through face detection (the faces "
                                                   "extra), its landmarks cached under corpus/<name>/landmarks/.")]
MeanFaceOpt = Annotated[Path | None, typer.Option(help="Reference face (68 x 2, .npy or text) for the mouth "
                                                  "alignment (default: mavsr's template).")]
MaxSecondsOpt = Annotated[float, typer.Option(help="Cut pretrain utterances into segments of at most this many "
                                              "seconds, on word boundaries.")]


@prepare_app.command("synth", cls=_Command, epilog=_examples("prepare synth"))
def prepare_synth(
    dir: DirOpt = Path("."),
    num_utts: Annotated[int, typer.Option(help="Utterances generated for training (a --val-share of them becomes "
                                          "data/val).")] = SYNTH.num_utts,
    test_utts: Annotated[int, typer.Option(help="Utterances in the test split.")] = SYNTH.test_utts,
    speakers: Annotated[int, typer.Option(help="Number of speakers (voice + face).")] = SYNTH.speakers,
    heldout_speakers: Annotated[int, typer.Option(help="Speakers used only in test (0 = test uses all).")]
    = SYNTH.heldout_speakers,
    seed: Annotated[int, typer.Option(help="Random seed; the corpus is a function of it.")] = SYNTH.seed,
    words_per_slot: Annotated[int, typer.Option(help="Draw each grammar slot (name, noun, ...) from its first N words "
                                                "only, a smaller vocabulary (0 = all, about 300 words).")]
    = SYNTH.words_per_slot,
    val_share: Annotated[float, typer.Option(help="Share of the training utterances held out as data/val "
                                             "(validation loss, best checkpoints).")] = SYNTH.val_share,
    nj: JobsOpt = default_jobs(),
    force: ForceOpt = False,
) -> None:
    """Generate the synthetic corpus under corpus/synth/ (an LRS3 tree: face video, Text: files,
    landmarks), then prepare it as lrs3: mouth ROIs under corpus/lrs3/, data/{train,val,test}/."""
    from .stages import prepare as stage

    opt = SynthOptions(num_utts, test_utts, speakers, heldout_speakers, seed, words_per_slot, nj, val_share)
    stage.run_synth(_recipe(dir, "data", "corpus"), opt, force, _log)
    _next(dir, "mavsr tiny-models --ctc-units align   # the synthetic recipe's small models (recipes/synth/run.sh)")


def _prepare_tree(corpus: str, dir: Path, root: Path | None, landmarks: Path | None, mean_face: Path | None,
                  max_seconds: float, shard: str | None, split: str, nj: int, force: bool,
                  val_share: float = 0.0, mouth_crops: bool = False) -> None:
    from .stages import prepare as stage

    recipe = _recipe(dir, "data", "corpus")
    if root is None:
        raise MavsrError(f"prepare {corpus} needs --root (the corpus folder)")
    opt = LrsOptions(root, landmarks, mean_face, max_seconds, nj, parse_shard(shard), split, val_share, mouth_crops)
    stage.run_lrs(recipe, corpus, opt, force, _log)
    if shard is None:
        _next(dir, f"mavsr extract-features --config conf/{corpus if corpus != 'dir' else '<yours>'}.yaml")


@prepare_app.command("lrs3", cls=_Command, epilog=_examples("prepare lrs3"))
def prepare_lrs3(dir: DirOpt = Path("."), root: RootOpt = None, landmarks: LandmarksOpt = None,
                 mean_face: MeanFaceOpt = None, max_seconds: MaxSecondsOpt = LRS.max_seconds,
                 shard: ShardOpt = None, nj: JobsOpt = default_jobs(), force: ForceOpt = False,
                 val_share: Annotated[float, typer.Option(help="Share of trainval held out as data/val (chosen by "
                                                          "utterance id).")] = LRS.val_share) -> None:
    """LRS3 (pretrain/, trainval/ -> train, a share of trainval -> val; test/): mouth-ROI media from the
    official tree and its landmarks under corpus/lrs3/, and data/{train,val,test}/manifest.jsonl."""
    _prepare_tree("lrs3", dir, root, landmarks, mean_face, max_seconds, shard, LRS.split, nj, force, val_share)


@prepare_app.command("lrs2", cls=_Command, epilog=_examples("prepare lrs2"))
def prepare_lrs2(dir: DirOpt = Path("."), root: RootOpt = None, landmarks: LandmarksOpt = None,
                 mean_face: MeanFaceOpt = None, max_seconds: MaxSecondsOpt = LRS.max_seconds,
                 shard: ShardOpt = None, nj: JobsOpt = default_jobs(), force: ForceOpt = False) -> None:
    """LRS2 (pretrain/, main/ with train/val/test lists): mouth-ROI media under corpus/lrs2/, and
    data/{train,val,test}/manifest.jsonl."""
    _prepare_tree("lrs2", dir, root, landmarks, mean_face, max_seconds, shard, LRS.split, nj, force)


@prepare_app.command("dir", cls=_Command, epilog=_examples("prepare dir"))
def prepare_dir(
    dir: DirOpt = Path("."),
    root: Annotated[Path | None, typer.Option(help="A folder of videos, each with a .txt transcript beside it "
                                              "and optionally a .pkl of landmarks (see --landmarks). A video "
                                              "without landmarks is taken as a mouth crop if it has that size "
                                              f"({MOUTH_CROP}, at most {MOUTH_CROP_MAX_SIDE} px a side); any "
                                              "other goes through face detection.")] = None,
    split: Annotated[str, typer.Option(help="The split the folder becomes (data/<split>/).")] = LRS.split,
    landmarks: LandmarksOpt = None, mean_face: MeanFaceOpt = None, max_seconds: MaxSecondsOpt = LRS.max_seconds,
    shard: ShardOpt = None, nj: JobsOpt = default_jobs(), force: ForceOpt = False,
    mouth_crops: Annotated[bool, typer.Option("--mouth-crops", help="Videos without landmarks are mouth crops: "
                                              "never detect a face; a video larger than a mouth crop is "
                                              "skipped.")] = False,
) -> None:
    """Any folder of videos with a .txt transcript beside each -> data/<split>/manifest.jsonl."""
    _prepare_tree("dir", dir, root, landmarks, mean_face, max_seconds, shard, split, nj, force,
                  mouth_crops=mouth_crops)


@prepare_app.command("csv", cls=_Command, epilog=_examples("prepare csv"))
def prepare_csv(
    dir: DirOpt = Path("."),
    csv: Annotated[Path | None, typer.Option(help="The label list: dataset,relative_path,frames,token_ids,text "
                                             "per line.")] = None,
    root: Annotated[Path | None, typer.Option(help="Its data root (media at <root>/<dataset>/<relative_path>).")]
    = None,
    split: Annotated[str, typer.Option(help="The split the list becomes (data/<split>/).")] = LRS.split,
    force: ForceOpt = False,
) -> None:
    """An LLM-AVSR label list of mouth-ROI media -> data/<split>/manifest.jsonl (media used in place)."""
    from .stages import prepare as stage

    recipe = _recipe(dir, "data", "corpus")
    if csv is None or root is None:
        raise MavsrError("prepare csv needs --csv (the label list) and --root (its data root)")
    stage.run_csv(recipe, csv, root, split, force, _log)


# ---- import: the authors' checkpoints ------------------------------------------------------------
import_app = typer.Typer(cls=_Corpora, no_args_is_help=True, help="Turn a checkpoint trained by the authors' code "
                         "into an experiment dir that decode and transcribe use: omni-avsr (Omni-AVSR's "
                         "Llama-AVSR / Llama-MTSK scripts), llama-avsr (the Llama-AVSR repository).")
app.add_typer(import_app, name="import")
CkptArg = Annotated[Path, typer.Argument(help="Their checkpoint: model_avg_N.pth (a flat tensor dict) or a Lightning "
                                         "epoch=K.ckpt (whose hyper-parameters then fill the options below).")]
ImportExpOpt = Annotated[Path, typer.Option(help="Experiment dir to create (exp/<tag>), relative to --dir or "
                                            "absolute.")]
LlmOpt = Annotated[str, typer.Option(help="The LLM it was trained on: hub id or local dir (checked against the "
                                     "checkpoint's copy).")]
AudioEncOpt = Annotated[str | None, typer.Option(help="The Whisper it was trained with: hub id or local dir "
                                                 "(audio models; checked against the checkpoint's copy).")]
VideoEncOpt = Annotated[str | None, typer.Option(help="The AV-HuBERT .pt it was trained from, for its hyper-parameters "
                                                 "(default: read off the tensor shapes); the weights are the "
                                                 "checkpoint's own.")]
RatesOpt = Annotated[str | None, typer.Option(help="Comma-separated, in the order of the training command's "
                                              "--downsample-ratio-{audio,video} (needed for a .pth with "
                                              "average pooling).")]
CompressionOpt = Annotated[str | None, typer.Option(help="avg or stack (default: the .ckpt's --compression-mode, "
                                                    "else avg for omni-avsr, stack for llama-avsr).")]
LoraScaleOpt = Annotated[float | None, typer.Option(help="Their LoRA's alpha / rank (default: the .ckpt's, else "
                                                    "0.125, which every published command uses).")]


def _import(flavour: str, ckpt: Path, exp: Path, dir: Path, llm: str, audio_encoder: str | None,
            video_encoder: str | None, audio_rates: str | None, video_rates: str | None, compression: str | None,
            lora_scale: float | None, force: bool) -> None:
    _quiet_libraries()
    from . import authors
    from .stages import imports as stage

    def ints(spec: str | None, what: str):
        try:
            return None if spec is None else tuple(int(x) for x in spec.split(","))
        except ValueError:
            raise MavsrError(f"--{what} must be comma-separated whole numbers, got {spec!r}") from None

    if compression not in (None, "avg", "stack"):
        raise MavsrError(f"--compression must be avg or stack, got {compression!r}")
    hints = authors.Hints(ints(audio_rates, "audio-rates"), ints(video_rates, "video-rates"), compression, lora_scale)
    src = stage.Sources(llm, audio_encoder, video_encoder)
    stage.run(_recipe(dir, exp), flavour, ckpt, exp, src, hints, force, _log)
    _next(dir, f"mavsr extract-features --config {exp}/config.yaml --split test", f"mavsr decode --exp {exp} --sweep")


@import_app.command("omni-avsr", cls=_Command, epilog=_examples("import omni-avsr"))
def import_omni(ckpt: CkptArg, exp: ImportExpOpt, llm: LlmOpt, dir: DirOpt = Path("."),
                audio_encoder: AudioEncOpt = None, video_encoder: VideoEncOpt = None, audio_rates: RatesOpt = None,
                video_rates: RatesOpt = None, compression: CompressionOpt = None, lora_scale: LoraScaleOpt = None,
                force: ForceOpt = False) -> None:
    """A Llama-AVSR or Llama-MTSK checkpoint of Omni-AVSR's train_LlamaAVSR.py -> exp/<tag>/ (config.yaml, meta.json,
    video_encoder.pt, ckpt/imported/)."""
    _import("omni-avsr", ckpt, exp, dir, llm, audio_encoder, video_encoder, audio_rates, video_rates, compression,
            lora_scale, force)


@import_app.command("llama-avsr", cls=_Command, epilog=_examples("import llama-avsr"))
def import_llama_avsr(ckpt: CkptArg, exp: ImportExpOpt, llm: LlmOpt, dir: DirOpt = Path("."),
                      audio_encoder: AudioEncOpt = None, video_encoder: VideoEncOpt = None,
                      audio_rates: RatesOpt = None, video_rates: RatesOpt = None, compression: CompressionOpt = None,
                      lora_scale: LoraScaleOpt = None, force: ForceOpt = False) -> None:
    """A checkpoint of the Llama-AVSR repository's train.py (e.g. its model zoo's .pth) -> exp/<tag>/."""
    _import("llama-avsr", ckpt, exp, dir, llm, audio_encoder, video_encoder, audio_rates, video_rates, compression,
            lora_scale, force)


# ---- the other stages ---------------------------------------------------------------------------
@app.command("tiny-models", cls=_Command, epilog=_examples("tiny-models"))
def tiny_models(
    dir: DirOpt = Path("."),
    audio_dim: Annotated[int, typer.Option(help="Whisper encoder width.")] = TINY.audio_dim,
    audio_layers: Annotated[int, typer.Option(help="Whisper encoder layers.")] = TINY.audio_layers,
    video_dim: Annotated[int, typer.Option(help="Lip encoder width.")] = TINY.video_dim,
    video_layers: Annotated[int, typer.Option(help="Lip encoder transformer layers.")] = TINY.video_layers,
    llm_hidden: Annotated[int, typer.Option(help="Llama hidden size.")] = TINY.llm_hidden,
    llm_layers: Annotated[int, typer.Option(help="Llama layers.")] = TINY.llm_layers,
    lm_epochs: Annotated[int, typer.Option(help="Language-model warm-up epochs on the train transcripts "
                                           "(0 = none).")] = TINY.lm_epochs,
    encoder_epochs: Annotated[int, typer.Option(help="Pretraining epochs of the audio encoder, and of the lip "
                                                "encoder unless --video-epochs (0 = keep random).")]
    = TINY.encoder_epochs,
    video_epochs: Annotated[int, typer.Option(help="Pretraining epochs of the lip encoder (-1: as --encoder-epochs).")]
    = TINY.video_epochs,
    ctc_units: Annotated[CtcUnits, typer.Option(help="Encoder pretraining targets: char or word (CTC over the "
                                                "transcript), or align (the word under each frame, from the Text: "
                                                "files' word timings).")] = CtcUnits(TINY.ctc_units),
    seed: Annotated[int, typer.Option(help="Random seed for the initial weights.")] = TINY.seed,
    force: ForceOpt = False,
) -> None:
    """Synthetic recipe only: build small Whisper, lip encoder and Llama into models/ (real on-disk formats)."""
    _quiet_libraries()
    from .stages import tiny_models as stage

    opt = TinyOptions(audio_dim, audio_layers, video_dim, video_layers, llm_hidden, llm_layers, lm_epochs,
                      encoder_epochs, video_epochs=video_epochs, seed=seed, ctc_units=ctc_units.value)
    stage.run(_recipe(dir, "models"), opt, force, _log)
    _next(dir, "mavsr extract-features --config conf/synth.yaml")


@app.command("extract-features", cls=_Command, epilog=_examples("extract-features"))
def extract_features(
    dir: DirOpt = Path("."),
    config: ConfigOpt = None,
    split: Annotated[list[str] | None, typer.Option("--split", "-s", metavar="SPLIT",
                                                    help="Split(s) to extract; repeat the option "
                                                    "for several. Default: every prepared split (data/*/).")] = None,
    shard: Annotated[str | None, typer.Option(help="i/N: compute only this worker's share of the shard files (N "
                                              "workers, one dump dir); run again without it to merge.")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Utterances per shard file.")] = SHARD_SIZE,
    modality: Annotated[Modality | None, typer.Option(help="Overriding the config: av, a (audio encoder only) or v "
                                                      "(video encoder only), as `train --modality` will read it.")]
    = None,
    device: Annotated[str, typer.Option(envvar=DEVICE_ENV, show_envvar=True,
                                        help="Where the encoders run: auto (a GPU when torch sees one, else the "
                                        "CPU), cpu, cuda or cuda:N. With --shard, give each worker its own GPU "
                                        "(CUDA_VISIBLE_DEVICES).")] = DEVICE,
    force: ForceOpt = False,
) -> None:
    """Run the frozen encoders once and cache native-rate features in dump/<encoders>/<split>/."""
    _quiet_libraries()
    from . import config as C
    from .stages import extract_features as stage

    config = _config_path(config, dir)
    cfg = C.load(config)
    if modality is not None:
        cfg = C.with_modality(cfg, modality.value)
    stage.run(_recipe(dir, "dump"), cfg, split, force, _log, parse_shard(shard), shard_size, device)
    if shard is None:
        _next(dir, _after_features(config, dir, modality, split))


def _after_features(config: Path | None, recipe_dir: Path, modality: Modality | None, splits: list[str] | None) -> str:
    """extract-features' next command: decode for the config of an experiment that has a checkpoint
    (one imported, or trained; --exp as decode reads it, under the recipe dir) or for splits other than
    train, else train (with the --modality the features were made for)."""
    from .recipe import decoding_checkpoint

    try:
        trained = config is not None and config.name == "config.yaml" and decoding_checkpoint(config.parent)
    except ValueError:  # an unreadable meta.json: decode will say so
        trained = False
    which = next((s for s in splits or [] if s != "train"), "test")
    split = f" --split {which}" if which != "test" else ""
    if trained:
        exp, root = config.parent.resolve(), recipe_dir.resolve()
        return f"mavsr decode --exp {exp.relative_to(root) if exp.is_relative_to(root) else exp}{split} --sweep"
    if splits and "train" not in splits:
        return f"mavsr decode --exp exp/<tag>{split} --sweep"
    return (f"mavsr train{f' --config {config}' if config else ''}"
            f"{f' --modality {modality.value}' if modality else ''} --rates all")


@app.command("train", cls=_Command, epilog=_examples("train"))
def train(
    dir: DirOpt = Path("."),
    config: ConfigOpt = None,
    rates: Annotated[str, typer.Option(help="'all' = every configuration of the config's grid, or tags like "
                                       "a4v2,a16v5.")] = "all",
    lora: Annotated[Strategy | None, typer.Option(help="LoRA strategy, overriding the config: ms (shared), ss (one "
                                                  "per configuration), mss (both).")] = None,
    modality: ModalityOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs, overriding train.epochs of the config.")] = None,
    tag: Annotated[str | None, typer.Option(help="Experiment name under exp/ (default: <config>_<lora>_<rates>).")]
    = None,
    force: ForceOpt = False,
) -> None:
    """Matryoshka training of projectors + LoRA over the frozen LLM; writes exp/<tag>/.

    An interrupted run resumes from its last checkpoint when started again with the same
    arguments (exactly: same batches, same losses). Under `torchrun --nproc_per_node N` the same
    command trains with N DDP processes (train.distributed: fsdp to shard instead). The modality
    needs a feature cache extracted for it."""
    _quiet_libraries()
    from . import config as C
    from .stages import train as stage

    config = _config_path(config, dir)
    cfg = C.load(config)
    if lora is not None:
        cfg = C.with_lora_strategy(cfg, lora.value)
    if modality is not None:
        cfg = C.with_modality(cfg, modality.value)
    if epochs is not None:
        cfg = C.with_epochs(cfg, epochs)
    tag = tag or stage.default_tag(str(config) if config else None, cfg.model.lora.strategy, rates,
                                   None if modality is None else cfg.model.modality)
    stage.run(_recipe(dir, "exp"), cfg, rates, tag, force, _log)
    if int(os.environ.get("RANK", "0")) == 0:
        _next(dir, f"mavsr decode --exp exp/{tag} --sweep")


@app.command("decode", cls=_Command, epilog=_examples("decode"))
def decode(
    exp: ExpOpt,
    dir: DirOpt = Path("."),
    split: Annotated[str, typer.Option(help="Split to decode.")] = "test",
    audio_rate: Annotated[int | None, typer.Option(help="Audio compression rate (must be in the trained grid).")]
    = None,
    video_rate: Annotated[int | None, typer.Option(help="Video compression rate (must be in the trained grid).")]
    = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Decode every trained configuration in one call (the "
                                        "model loads once).")] = False,
    budget: Annotated[float | None, typer.Option(help="LLM input tokens per second of speech (media + prompt, "
                                                 "as RESULTS.md and REPORT.md count them, over the split's mean "
                                                 "duration): decode the trained pair of lowest scored WER (val, "
                                                 "else test) that fits, else the least compressed; the log says "
                                                 "why.")] = None,
    beam: BeamOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Utterances decoded together (default: the config's "
                                                   "decode.batch_size); the hypotheses do not depend on it.")] = None,
    max_new_tokens: MaxTokensOpt = None,
    snr: Annotated[float | None, typer.Option(help="Add noise to the audio at this SNR in dB (seeded per utterance; "
                                              "encoded once into its own cache).")] = None,
    noise: NoiseOpt = None,
    shard: Annotated[str | None, typer.Option(help="i/N: decode only this worker's share into a part file; run again "
                                              "without it to merge.")] = None,
    pool_rates: Annotated[str | None, typer.Option(help="Inference-only pooling (the paper's baseline), e.g. a16v5: "
                                                   "pool the features at these rates but use the projectors of "
                                                   "--audio-rate/--video-rate (say a model trained at rate 1). "
                                                   "Average-pooling models only.")] = None,
    device: DeviceOpt = DEVICE,
    force: ForceOpt = False,
) -> None:
    """Decode a split at one rate pair (or --sweep, --budget) into exp/<tag>/decode_<rates>_beam<B>/<split>/.

    The dir name also carries _pool<rates> (--pool-rates) and _<noise>snr<X> (--snr); see rates.DecodeTag."""
    _quiet_libraries()
    from .stages import decode as stage

    stage.run(_recipe(dir, exp), exp, split, audio_rate, video_rate, force, _log, shard=parse_shard(shard),
              sweep=sweep, budget=budget, beam=beam, batch_size=batch_size, max_new_tokens=max_new_tokens,
              snr=snr, noise=noise, pool=pool_rates, device=device)
    if shard is None:
        _next(dir, f"mavsr score --exp {exp}")


@app.command("transcribe", cls=_Command, epilog=_examples("transcribe"))
def transcribe(
    media: Annotated[Path, typer.Argument(help="Video (or audio) file in any container PyAV reads.")],
    exp: ExpOpt,
    dir: DirOpt = Path("."),
    audio_rate: Annotated[int | None, typer.Option(help="Audio compression rate (default: the least compressed "
                                                   "trained configuration).")] = None,
    video_rate: Annotated[int | None, typer.Option(help="Video compression rate (must be in the trained grid).")]
    = None,
    budget: Annotated[float | None, typer.Option(help="LLM input tokens per second of this clip (media + prompt, "
                                                 "as the reports count): the most accurate trained configuration "
                                                 "that fits (its reason goes to stderr).")] = None,
    roi: Annotated[str | None, typer.Option(help="Mouth region x,y,w,h in pixels. Default: a video of mouth-crop "
                                            f"size ({MOUTH_CROP}, at most {MOUTH_CROP_MAX_SIDE} px a side) is "
                                            "used whole; any other goes through face detection (the faces "
                                            "extra).")] = None,
    mouth_crop: Annotated[bool, typer.Option("--mouth-crop", help="The video is a mouth crop: use the whole frame, "
                                             "never detect.")] = False,
    save_roi: Annotated[Path | None, typer.Option(help="Also write the 96x96 mouth crop that was decoded to this mp4 "
                                                  "file.")] = None,
    modality: Annotated[Modality | None, typer.Option(help="av, a or v; must be the experiment's (default: the "
                                                      "experiment's).")] = None,
    beam: BeamOpt = None,
    max_new_tokens: MaxTokensOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON record with rates, tokens and timings "
                                           "instead of the text.")] = False,
    device: DeviceOpt = DEVICE,
) -> None:
    """Transcribe one media file with a trained experiment (encoders run on the fly)."""
    _quiet_libraries()
    import json

    from .stages import transcribe as stage

    res = stage.run(_recipe(dir), exp, media, audio_rate, video_rate, budget, roi, _value(modality), beam,
                    max_new_tokens, log=lambda m: print(m, file=sys.stderr), mouth_crop=mouth_crop,
                    save_roi=save_roi, device=device)
    _log(json.dumps(res, ensure_ascii=False) if json_out else res["text"])


@app.command("serve", cls=_Command, epilog=_examples("serve"))
def serve(
    exp: Annotated[list[Path], typer.Option(metavar="DIR",
                                            help="Experiment dir (exp/<tag>); repeat it to serve one of each "
                                            "modality: an upload goes to the audio-visual one when it has both "
                                            "streams, else to the audio-only or video-only one.")],
    dir: DirOpt = Path("."),
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = SERVE.host,
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one (printed at start-up).")] = SERVE.port,
    rates: Annotated[str, typer.Option(help="auto: pick the rate pair per batch to keep the p95 latency under "
                                       "--slo-ms (the most accurate pair while idle); a tag (a4v2): always "
                                       "that pair. A request's own rates or budget field wins.")] = SERVE.rates,
    slo_ms: Annotated[float, typer.Option(help="Latency target of --rates auto, ms from request to response.")]
    = SERVE.slo_ms,
    max_batch: Annotated[int, typer.Option(help="Most utterances decoded together.")] = SERVE.max_batch,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to join its batch.")]
    = SERVE.batch_wait_ms,
    max_queue: Annotated[int, typer.Option(help="Requests admitted at once; more get 503 with Retry-After.")]
    = SERVE.max_queue,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload; a larger one gets 413.")]
    = SERVE.max_upload_mb,
    max_seconds: Annotated[float, typer.Option(help="Longest media; a longer upload gets 413.")]
    = SERVE.max_seconds,
    api_key: Annotated[str | None, typer.Option(envvar="MAVSR_API_KEY", show_envvar=True, show_default=False,
                                                help="Require 'Authorization: Bearer KEY' on /v1 and /metrics.")]
    = SERVE.api_key,
    warmup_seconds: Annotated[float, typer.Option(help="The start-up decodes that measure each pair's cost for "
                                                  "the controller use the recipe's first val or test clip; "
                                                  "without one, random features of this many seconds.")]
    = SERVE.warmup_seconds,
    device: DeviceOpt = SERVE.device,
    beam: Annotated[int | None, typer.Option(help="Beam width of requests that name none, and of the start-up "
                                             "decodes that measure each pair's cost (the controller is surest "
                                             "at the beam it measured). 1 to 64. Default: each experiment's "
                                             "decode.beam (one above 64 is refused: pass --beam).")]
    = SERVE.beam,
) -> None:
    """Serve transcription over HTTP (OpenAI's /v1/audio/transcriptions shape), batching requests and
    trading compression for latency under load. Needs the serve extra."""
    _quiet_libraries()
    from .stages import serve as stage

    for name, v in (("--max-batch", max_batch), ("--max-queue", max_queue)):
        if v < 1:
            raise MavsrError(f"{name} must be at least 1, got {v}")
    for name, v in (("--slo-ms", slo_ms), ("--max-upload-mb", max_upload_mb), ("--max-seconds", max_seconds),
                    ("--warmup-seconds", warmup_seconds)):
        if v <= 0:
            raise MavsrError(f"{name} must be > 0, got {v:g}")
    if batch_wait_ms < 0:
        raise MavsrError(f"--batch-wait-ms must be at least 0, got {batch_wait_ms:g}")
    if not 0 <= port <= 65535:
        raise MavsrError(f"--port must be 0 to 65535, got {port}")
    if beam is not None and not 1 <= beam <= SERVE_MAX_BEAM:
        raise MavsrError(f"--beam must be 1 to {SERVE_MAX_BEAM}, got {beam}")
    opts = ServeOptions(host, port, rates, slo_ms, max_batch, batch_wait_ms, max_queue, max_upload_mb, max_seconds,
                        api_key, warmup_seconds, device, beam)
    stage.run(_recipe(dir), exp, opts, log=lambda m: print(m, file=sys.stderr, flush=True))


@app.command("bench", cls=_Command, epilog=_examples("bench"))
def bench(
    exp: Annotated[list[Path], typer.Option(metavar="DIR",
                                            help="Experiment dir(s) (exp/<tag>); repeat the option to compare "
                                            "several (e.g. AV, audio-only, video-only, baselines).")],
    dir: DirOpt = Path("."),
    split: Annotated[str, typer.Option(help="Split to decode.")] = BENCH.split,
    snr: Annotated[str, typer.Option(help="Conditions, comma-separated: clean and babble SNRs in dB.")]
    = ",".join("clean" if s is None else f"{s:g}" for s in BENCH.snrs),
    noise: Annotated[str | None, typer.Option(help="Noise for the SNR conditions: babble, white, or an audio file "
                                              f"(default: {BENCH.noise}).")] = None,
    beam: Annotated[int, typer.Option(help="Beam width (1 = greedy).")] = BENCH.beam,
    batch_size: Annotated[int | None, typer.Option(help="Utterances decoded together (default: config).")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Timed decodes of every pair per condition, the pairs taking "
                                        "turns; each row keeps its least time (steadier on a shared "
                                        "machine).")] = BENCH.rounds,
    out: Annotated[Path | None, typer.Option(help="Report dir (default: exp/<tag>/bench for one experiment, bench/ "
                                             "for several).")] = None,
    device: DeviceOpt = BENCH.device,
) -> None:
    """Elastic-inference report: every trained rate pair x modality x noise condition decoded in one run, with
    WER, LLM tokens/s, latency, RTF and peak memory (CSV, JSON, REPORT.md, PNG plots)."""
    _quiet_libraries()
    from .stages import bench as stage

    snrs = stage.parse_snrs(snr)
    seen = [x.resolve() for x in exp]
    if len(set(seen)) < len(seen):
        twice = next(x for x, r in zip(exp, seen, strict=True) if seen.count(r) > 1)
        raise MavsrError(f"--exp {twice} is given twice: each experiment is a row set of the report once")
    if noise is not None and all(s is None for s in snrs):
        raise MavsrError(f"--noise {noise} is the noise of the SNR conditions; give one in --snr too (e.g. clean,10)")
    opt = BenchOptions(split=split, snrs=snrs, noise=noise or BENCH.noise, beam=beam, batch_size=batch_size,
                       rounds=rounds, device=device)
    stage.run(_recipe(dir, *exp), exp, opt, out, _log)


@app.command("claims", cls=_Command, epilog=_examples("claims"))
def claims(
    bench: Annotated[Path, typer.Option(help="bench.json (or its dir) of `mavsr bench` over the Matryoshka, "
                                        "audio-only and video-only experiments.")],
    matryoshka: Annotated[list[Path], typer.Option(metavar="DIR",
                                                   help="Matryoshka experiment(s): the first is the one in the "
                                                   "bench; repeat for other LoRA strategies (checked from their "
                                                   "decode dirs).")],
    baseline: Annotated[list[Path] | None, typer.Option(metavar="DIR",
                                                        help="Per-rate baseline experiment (one trained "
                                                        "configuration each); repeat for each.")] = None,
    rate1: Annotated[Path | None, typer.Option(help="Experiment trained at rate 1, decoded with --pool-rates at the "
                                               "Matryoshka grid's pairs.")] = None,
    audio_only: Annotated[Path | None, typer.Option(help="Audio-only experiment (in the bench).")] = None,
    video_only: Annotated[Path | None, typer.Option(help="Video-only experiment (in the bench).")] = None,
    dir: DirOpt = Path("."),
    split: Annotated[str, typer.Option(help="Split the decode dirs were made for.")] = "test",
    margin: Annotated[float, typer.Option(help="Claim 1: Matryoshka WER at most this many points above the "
                                          "baseline.")] = BOUNDS.margin,
    target_best: Annotated[float, typer.Option(help="Target: clean WER below this at the least compressed pair.")]
    = BOUNDS.target_best,
    target_worst: Annotated[float, typer.Option(help="Target: clean WER below this at the most compressed pair.")]
    = BOUNDS.target_worst,
    gentle: Annotated[float, typer.Option(help="Claim 2: WER rise from the least to the most compressed pair at most "
                                          "this.")] = BOUNDS.gentle,
    collapse: Annotated[float, typer.Option(help="Claim 2: the pooled rate-1 model at least this many points worse at "
                                            "the most compressed pair.")] = BOUNDS.collapse,
    av_slack: Annotated[float, typer.Option(help="Claim 3: AV WER must be below audio-only's plus this (0: strictly "
                                            "lower).")] = BOUNDS.av_slack,
    video_max: Annotated[float, typer.Option(help="Claim 3: video-only WER below this.")] = BOUNDS.video_max,
    linear_tol: Annotated[float, typer.Option(help="Claim 4: media tokens within this fraction of the "
                                              "rate-proportional count.")] = BOUNDS.linear_tol,
    out: Annotated[Path | None, typer.Option(help="Where CLAIMS.md and claims.json go (default: beside "
                                             "bench.json).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when a claim or target fails.")] = False,
) -> None:
    """Check the paper's four claims (and the accuracy targets) on a finished study: a verdict per claim with the
    numbers behind it (CLAIMS.md, claims.json). Decodes nothing."""
    from .stages import claims as stage

    bounds = Bounds(margin=margin, target_best=target_best, target_worst=target_worst, gentle=gentle,
                    collapse=collapse, av_slack=av_slack, video_max=video_max, linear_tol=linear_tol)
    res = stage.run(_recipe(dir), bench, matryoshka, baseline or [], rate1, audio_only, video_only, bounds, out,
                    split, _log)
    if strict and not all(c.holds for c in res):
        raise typer.Exit(1)


@app.command("score", cls=_Command, epilog=_examples("score"))
def score(
    exp: ExpOpt,
    dir: DirOpt = Path("."),
    normaliser: Annotated[Normaliser, typer.Option(help="Text normaliser for ref and hyp alike: default (lower-case, "
                                                   "no punctuation but apostrophes) or none.")] = Normaliser.default,
    force: ForceOpt = False,
) -> None:
    """Score every finished decode dir of an experiment and write exp/<tag>/RESULTS.md.

    Per decode dir: wer.json, result.txt, errors.txt (per-utterance alignments), ref.trn and hyp.trn."""
    from .stages import score as stage

    stage.run(_recipe(dir, exp), exp, force, _log, normaliser=normaliser.value)
    _next(dir, f"mavsr bench --exp {exp}", f"mavsr transcribe VIDEO --exp {exp}")


@app.command("info", cls=_Command, epilog=_examples("info"))
def info(
    dir: DirOpt = Path("."),
    grid: Annotated[Path | None, typer.Option(help="Print only the rate tags of this config's grid, one per line "
                                              "(for scripts); relative to --dir.")] = None,
) -> None:
    """Print versions of mavsr and its libraries, torchaudio's status and the available devices, then
    what the recipe dir holds: each stage's outputs, finished or not."""
    if grid is not None:
        from . import config as C

        for r in C.load(grid if grid.is_absolute() else dir / grid).model.rate_grid():
            _log(r.tag)
        return
    _quiet_libraries()
    for line in _versions():
        _log(line)
    from .recipe import status_lines

    for line in status_lines(_recipe(dir)):
        _log(line)


def _versions() -> list[str]:
    import platform

    import av
    import peft
    import torch
    import transformers

    from . import __version__, compat

    cuda = torch.cuda.is_available()
    devices = f"cpu ({os.cpu_count()} cores)" + (
        f", cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if cuda else "")
    return [f"mavsr {__version__}, Python {platform.python_version()} on {platform.machine()}",
            f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"PyAV {av.__version__}",
            "torchaudio: " + ("usable" if compat.TORCHAUDIO is not None else f"not used ({compat.TORCHAUDIO_ERROR})"),
            f"devices: {devices}"]


def main() -> None:
    lifecycle.run(app)


if __name__ == "__main__":
    main()
