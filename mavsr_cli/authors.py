"""Checkpoints of the authors' code read as mavsr tensors (`mavsr import`).

Two code bases write them: Omni-AVSR's Llama-AVSR / Llama-MTSK scripts (`train_LlamaAVSR.py`, the
Matryoshka code, flavour `omni-avsr`) and the Llama-AVSR repository (`train.py`, flavour
`llama-avsr`). Their layout, as read from umbertocappellazzo/Omni-AVSR (7de6be2) and
umbertocappellazzo/Llama-AVSR (410842d):

  file        model_avg_N.pth: a flat dict of every tensor of their AVSR module (bf16), i.e. a
              Lightning epoch=K.ckpt's `state_dict` without the leading "model."; the .ckpt also
              holds `hyper_parameters` (their argparse options). Both are read.
  audio_encoder.*       the frozen Whisper encoder (WhisperModel.encoder names)
  video_encoder.*       fairseq AV-HuBERT; frozen, but its BatchNorm statistics move in training, and
                        `--use-lora-avhubert` adds self_attn.lora_{down,up}_{Q,V} (scale 2)
  audio_proj[.k].{0,2[,3]}.*  Linear-ReLU-Linear[-LayerNorm]; Matryoshka: one per rate, k = the
                        rate's position in --downsample-ratio-audio; likewise video_proj
  llm.model.embed_tokens.weight  (V + 5, D): the LLM's V rows, then <pad> <audio> </audio> <video>
                        </video> (added in that order; frozen, so still their random initial rows)
  llm.model.layers.i.self_attn.lora_down_{Q,V}.weight (r, D), lora_up_{Q,V}.weight (out, r):
                        q = q_proj(x) + up(down(x)) * alpha / rank_arg (their --rank is a divisor of
                        the LLM width: r = D / rank_arg); the same for v; no dropout
  the rest of llm.*     the frozen LLM (lm_head too)

Their forward at test time (modeling_LlamaAVSR.py), which mavsr's computes over the original
vocabulary: [BOS] <audio> proj_a(pool_a(Whisper)) </audio> <video> proj_v(pool_v(AV-HuBERT))
</video> prompt, pooling by AvgPool1d(rate) (or stacking r frames) before the projector, the
waveform layer-normed before Whisper's log-mel. In mavsr: the projectors and markers are the
checkpoint's, their LoRA is a peft adapter (A = down, B = up, lora_alpha = scale x r), the
AV-HuBERT is rewritten from the checkpoint's own tensors (its LoRA merged into q/v), and the LLM
and Whisper named on the command line are checked against the checkpoint's copies.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from .config import PROMPTS
from .errors import MavsrError
from .safe_pickle import load_checkpoint

ADDED = ("<pad>", "<audio>", "</audio>", "<video>", "</video>")  # rows appended to the vocabulary, in order
LORA_KEY = re.compile(r"^llm\.model\.layers\.(\d+)\.self_attn\.lora_(down|up)_([QV])\.weight$")
AVH_LORA_KEY = re.compile(r"^video_encoder\.encoder\.layers\.(\d+)\.self_attn\.lora_(down|up)_([QV])\.weight$")
AVH_LORA_SCALE = 2.0  # their AV-HuBERT LoRA's fixed scale
SAME_WEIGHTS = 5e-3  # relative difference up to which a frozen tensor is the named model's (bf16 rounds by 0.2%)


@dataclasses.dataclass(frozen=True)
class Hints:
    """What a .pth does not say about itself, from the command line (None: from the .ckpt's
    hyper-parameters, else the flavour's default)."""

    audio_rates: tuple[int, ...] | None = None  # their --downsample-ratio-audio, in order
    video_rates: tuple[int, ...] | None = None  # their --downsample-ratio-video, in order
    compression: str | None = None  # avg or stack
    lora_scale: float | None = None  # their alpha / rank


@dataclasses.dataclass(frozen=True)
class Layout:
    """A checkpoint of the authors' code, described in mavsr's terms."""

    modality: str  # av, a or v
    audio_rates: tuple[int, ...]
    video_rates: tuple[int, ...]
    compression: str
    layernorm: bool
    hidden: int  # projector hidden width
    lora_rank: int
    lora_scale: float
    prompt: str
    max_new_tokens: int
    beam: int
    single: tuple[str, ...] = ()  # streams whose projector is one Sequential (no per-rate ModuleList)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors without the "model." prefix, hyper-parameters) of a .pth or a Lightning .ckpt."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".safetensors":
        raise MavsrError(f"{p} is not a checkpoint of the authors' code (a .pth or .ckpt file); a mavsr "
                         "experiment needs no import")
    obj = load_checkpoint(p)
    hparams = {}
    if "state_dict" in obj:  # Lightning
        hp = obj.get("hyper_parameters") or {}
        hparams = dict(hp) if isinstance(hp, dict) else dict(vars(hp))
        obj = {k.removeprefix("model."): v for k, v in obj["state_dict"].items()}
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None or not any(k.startswith(("audio_proj", "video_proj")) for k in obj):
        what = f"its entry {bad!r} is not a tensor" if bad is not None else "it has no audio_proj or video_proj"
        raise MavsrError(f"{p} is not a checkpoint of the authors' code: {what}")
    return obj, hparams


ENCODER_WIDTH = {"audio": "audio_encoder.layer_norm.weight", "video": "video_encoder.encoder.layer_norm.weight"}


def _stacked_rates(state: dict, stream: str, keys: list[str]) -> list[int] | None:
    """Stacking r frames widens a projector's input r-fold: the rates read off the shapes."""
    width = state.get(ENCODER_WIDTH[stream])
    if width is None:
        return None
    ins = [state[k].shape[1] for k in sorted(keys, key=lambda k: [int(x) for x in k.split(".") if x.isdigit()])]
    return [i // width.shape[0] for i in ins] if all(i % width.shape[0] == 0 for i in ins) else None


def _rates(state: dict, stream: str, given, hp_value, compression: str) -> tuple[int, ...]:
    """The rates of one stream's projectors, in their order in the checkpoint."""
    keys = [k for k in state if k.startswith(f"{stream}_proj.") and k.endswith(".0.weight")]
    if not keys:
        return ()
    count = 1 if f"{stream}_proj.0.weight" in state else len(keys)
    rates = given if given is not None else hp_value
    if isinstance(rates, int):
        rates = [rates]
    if rates is None and compression == "stack":
        rates = _stacked_rates(state, stream, keys)
    if rates is None:
        opt = f"--{stream}-rates"
        raise MavsrError(f"the checkpoint's {count} {stream} projector(s) do not say their rates: give {opt} "
                         f"(the training command's --downsample-ratio-{stream}, in its order)")
    rates = tuple(int(r) for r in rates)
    if len(rates) != count:
        raise MavsrError(f"{count} {stream} projector(s) in the checkpoint, but {len(rates)} rates given: "
                         f"{','.join(map(str, rates))}")
    return rates


def _proj(stream: str, k: int | None) -> str:
    """The key prefix of a stream's k-th projector (None: the single one of a one-rate model)."""
    return f"{stream}_proj." if k is None else f"{stream}_proj.{k}."


def describe(state: dict, hp: dict, flavour: str, hints: Hints) -> Layout:
    """The checkpoint's layout: streams and rates from its projectors (and the hints or the
    hyper-parameters), LayerNorm from the presence of a projector's fourth layer, the LoRA width
    from its tensors."""
    _refuse_unknown_parts(state)
    compression = _compression(hints, hp, flavour)
    audio = _rates(state, "audio", hints.audio_rates, hp.get("downsample_ratio_audio"), compression)
    video = _rates(state, "video", hints.video_rates, hp.get("downsample_ratio_video"), compression)
    modality = ("a" if audio else "") + ("v" if video else "")
    if not modality:
        raise MavsrError("the checkpoint's projectors have no first layer (audio_proj[.K].0.weight or video_proj...)")
    stream = "audio" if audio else "video"
    first = _proj(stream, None if f"{stream}_proj.0.weight" in state else 0)
    lora = state.get("llm.model.layers.0.self_attn.lora_down_Q.weight")
    if lora is None:
        raise MavsrError("the checkpoint has no LLM LoRA (llm.model.layers.0.self_attn.lora_down_Q.weight)")
    return Layout(
        modality=modality, audio_rates=audio, video_rates=video,
        compression=compression, layernorm=f"{first}3.weight" in state,
        hidden=state[f"{first}0.weight"].shape[0], lora_rank=lora.shape[0], lora_scale=_scale(hints, hp),
        prompt=_prompt(hp, modality), max_new_tokens=int(hp.get("max_dec_tokens") or 32),
        beam=int(hp.get("num_beams") or 15),
        single=tuple(s for s in ("audio", "video") if f"{s}_proj.0.weight" in state))


def _compression(hints: Hints, hp: dict, flavour: str) -> str:
    """avg or stack: given, else the hyper-parameters', else the flavour's default (Omni-AVSR's
    Matryoshka code pools by averaging; Llama-AVSR's train.py stacks by default)."""
    mode = hints.compression or {"avg-pooling": "avg", "stack": "stack"}.get(hp.get("compression_mode"))
    return mode or ("avg" if flavour == "omni-avsr" else "stack")


def _scale(hints: Hints, hp: dict) -> float:
    """Their LoRA scale alpha / rank_arg (rank_arg: --rank or --reduction_lora); every documented
    command and both repos' defaults give 0.125 (4/32, 8/64)."""
    if hints.lora_scale is not None:
        return float(hints.lora_scale)
    rank = hp.get("rank", hp.get("reduction_lora"))
    if rank and hp.get("alpha") is not None:
        return float(hp["alpha"]) / float(rank)
    return 0.125


def _prompt(hp: dict, modality: str) -> str:
    """Their prompt for the modality when the hyper-parameters name one other than the paper's."""
    name = {"a": "prompt_audio", "v": "prompt_video", "av": "prompt_audiovisual"}[modality]
    text = hp.get(name)
    return "" if not text or text == PROMPTS[modality] else str(text)


def _refuse_unknown_parts(state: dict) -> None:
    """One line naming the first tensor of a part mavsr cannot map."""
    for k in state:
        if ".lora_" in k and k.startswith("llm.") and not LORA_KEY.match(k):
            raise MavsrError(f"cannot map {k}: mavsr maps the authors' one shared LoRA on q/v (the task-specific "
                             "LoRA of Omni-AVSR-T/-ST, or LoRA elsewhere, is not Llama-MTSK's)")
        if k.startswith(("audiovisual_", "prompt_")):
            raise MavsrError(f"cannot map {k}: a single AV-HuBERT for both streams, or Omni-AVSR's prompt "
                             "buffers, are not part of a Llama-MTSK / Llama-AVSR model")
        known = ("audio_encoder.", "video_encoder.", "audio_proj.", "video_proj.", "llm.")
        if not k.startswith(known):
            raise MavsrError(f"cannot map {k}: not a part of the authors' Llama-AVSR / Llama-MTSK model")


def trained_state(state: dict, layout: Layout, mavsr_names: list[str], vocab: int) -> dict[str, torch.Tensor]:
    """The checkpoint's trained tensors under mavsr's names (fp32): `mavsr_names` are the trained
    tensor names of a mavsr model built for `layout`; `vocab`, the rows of the LLM before theirs."""
    out: dict[str, torch.Tensor] = {}
    markers = marker_rows(state, vocab)
    for name in mavsr_names:
        if name == "markers":
            out[name] = markers
            continue
        theirs = _their_projector_key(name, layout) if name.startswith("projectors.") else _their_lora_key(name)
        if theirs not in state:
            raise MavsrError(f"the checkpoint has no {theirs}, which the model it describes needs")
        out[name] = state[theirs]
    used = set(_their_projector_key(n, layout) for n in mavsr_names if n.startswith("projectors."))
    left = [k for k in state if k.startswith(("audio_proj.", "video_proj.")) and k not in used]
    if left:
        raise MavsrError(f"cannot map {left[0]}: no projector of the mavsr model takes it")
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _their_projector_key(name: str, layout: Layout) -> str:
    """projectors.a16.2.weight -> audio_proj.1.2.weight (rate 16 second in the audio rates)."""
    _, key, rest = name.split(".", 2)
    stream = "audio" if key[0] == "a" else "video"
    rates = layout.audio_rates if stream == "audio" else layout.video_rates
    k = None if stream in layout.single else rates.index(int(key[1:]))
    return _proj(stream, k) + rest


def _their_lora_key(name: str) -> str:
    """A peft LoRA tensor of mavsr (...layers.3.self_attn.q_proj.lora_A.ms.weight) -> theirs."""
    m = re.search(r"layers\.(\d+)\.self_attn\.([qv])_proj\.lora_([AB])\.", name)
    if m is None:
        raise MavsrError(f"mavsr tensor {name} has no counterpart in the authors' layout")
    layer, proj, ab = m.groups()
    return f"llm.model.layers.{layer}.self_attn.lora_{'down' if ab == 'A' else 'up'}_{proj.upper()}.weight"


def marker_rows(state: dict, vocab: int) -> torch.Tensor:
    """(4, D): the embedding rows of <audio> </audio> <video> </video>, the last four of the rows
    added after the LLM's `vocab` (five with their <pad>, four where the tokenizer had one)."""
    emb = state["llm.model.embed_tokens.weight"]
    extra = emb.shape[0] - vocab
    if extra not in (4, 5):
        raise MavsrError(f"llm.model.embed_tokens.weight has {emb.shape[0]} rows: {extra:+d} beside the --llm's "
                         f"{vocab}, where the authors' code adds 5 ({' '.join(ADDED)}); another LLM?")
    return emb[-4:]


def check_frozen(state: dict, prefix: str, own: dict[str, torch.Tensor], what: str, vocab: int | None = None) -> None:
    """The checkpoint's copy of a frozen model (its tensors under `prefix`) is the model named on
    the command line (`own`, its state dict), up to the bf16 rounding of the checkpoint; `vocab`:
    only the first rows of the embedding and output layers (the rest are the authors' additions)."""
    theirs = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and ".lora_" not in k}
    for name, mine in own.items():
        if name not in theirs:
            raise MavsrError(f"the checkpoint has no {prefix}{name}, which {what} has")
        t = theirs.pop(name)
        if vocab is not None and name.endswith(("embed_tokens.weight", "lm_head.weight")):
            t = t[:vocab]
        if t.shape != mine.shape:
            raise MavsrError(f"{prefix}{name} is {tuple(t.shape)} in the checkpoint, {tuple(mine.shape)} in {what}: "
                             "not the model it was trained with")
        gap = (t.float() - mine.float()).norm() / (mine.float().norm() + 1e-6)
        if gap > SAME_WEIGHTS:
            raise MavsrError(f"{prefix}{name} differs from {what} ({gap:.1%} apart): not the model it was trained "
                             "with")
    if theirs:
        raise MavsrError(f"cannot map {prefix}{next(iter(theirs))}: {what} has no such tensor")


def video_encoder_state(state: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's AV-HuBERT under fairseq's names (fp32), its LoRA (if any) merged into the
    q/v projections: W + 2 * up @ down, the same map as fairseq's forward_lora (which adds the LoRA
    before the head scaling, the bias untouched)."""
    out = {k.removeprefix("video_encoder."): v.float() for k, v in state.items()
           if k.startswith("video_encoder.") and not AVH_LORA_KEY.match(k)}
    for k in state:
        m = AVH_LORA_KEY.match(k)
        if m is None or m.group(2) != "down":
            continue
        layer, _, qv = m.groups()
        up_key = f"video_encoder.encoder.layers.{layer}.self_attn.lora_up_{qv}.weight"
        if up_key not in state:
            raise MavsrError(f"the checkpoint has {k} but no {up_key}")
        up = state[up_key].float()
        w = f"encoder.layers.{layer}.self_attn.{qv.lower()}_proj.weight"
        if w not in out:
            raise MavsrError(f"the checkpoint has {k} but no video_encoder.{w} to merge it into")
        out[w] = out[w] + AVH_LORA_SCALE * up @ state[k].float()
    return out


def avhubert_config(state: dict, given: dict | None) -> dict:
    """The AV-HuBERT hyper-parameters: those of the checkpoint it was trained from (`given`, its
    cfg['model']), else read off the tensor shapes (64-wide heads, pre-LN: every released model)."""
    if given is not None:
        return given
    if "encoder.layer_norm.weight" not in state:
        raise MavsrError("the checkpoint has video projectors but no AV-HuBERT "
                         "(video_encoder.encoder.layer_norm.weight)")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    dim = state["encoder.layer_norm.weight"].shape[0]
    return {"encoder_layers": len(layers), "encoder_embed_dim": dim,
            "encoder_ffn_embed_dim": state["encoder.layers.0.fc1.weight"].shape[0],
            "encoder_attention_heads": max(1, dim // 64),
            "conv_pos": state["encoder.pos_conv.0.weight_v"].shape[-1],
            "conv_pos_groups": dim // state["encoder.pos_conv.0.weight_v"].shape[1],
            "resnet_channels": state["feature_extractor_video.resnet.frontend3D.0.weight"].shape[0]}
