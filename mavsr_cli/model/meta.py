"""Build a config's model on the meta device: shapes and parameter counts without any download.

The LLM and Whisper encoder come from their published configs (the hub ids the shipped recipes
name), the AV-HuBERT video encoder from mavsr's own module, and the projectors, adapters and
markers from `build_model`, exactly as `mavsr train` makes them. Nothing is allocated.
"""

from __future__ import annotations

from ..config import Config
from ..errors import MavsrError
from ..rates import Rates

# config.json of the hub checkpoints (the fields that shape the model)
LLAMA = {
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "Llama-3.2-3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False),
}
WHISPER = {"whisper-small": (768, 12, 12), "whisper-medium": (1024, 24, 16), "whisper-large-v3": (1280, 32, 20),
           "whisper-small.en": (768, 12, 12), "whisper-medium.en": (1024, 24, 16)}  # .en: the same encoders
PUBLISHED_M = {"Llama-3.2-1B": 1235.8, "Llama-3.2-3B": 3212.7, "Llama-3.1-8B": 8030.3}  # parameters, millions


def _known(name: str, table: dict) -> str:
    key = name.rstrip("/").split("/")[-1]
    if key not in table:
        raise MavsrError(f"no built-in config for {name!r} (known: {', '.join(table)})")
    return key


def build_on_meta(cfg: Config, rates: list[Rates] | None = None):
    """-> (AVSR model, {"audio": n, "video": n} encoder parameter counts), all on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperModel

    from . import llm as llm_mod
    from .avhubert import AVHubertConfig, AVHubertVideoEncoder
    from .build import build_model

    m = cfg.model
    enc_params, dims = {}, {"audio": None, "video": None}
    tok = llm_mod.word_tokenizer(m.resolved_prompt().lower().replace(".", " .").split())
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=128256, **LLAMA[_known(m.llm, LLAMA)]))
        llm.eval().requires_grad_(False)
        if m.modality in ("av", "a"):
            d, layers, heads = WHISPER[_known(cfg.audio_encoder.path, WHISPER)]
            enc = WhisperModel(WhisperConfig(d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
                                             encoder_ffn_dim=4 * d, decoder_layers=1, decoder_attention_heads=heads,
                                             num_mel_bins=128 if "large-v3" in cfg.audio_encoder.path else 80)).encoder
            enc_params["audio"], dims["audio"] = sum(p.numel() for p in enc.parameters()), d
        if m.modality in ("av", "v"):
            venc = AVHubertVideoEncoder(AVHubertConfig())  # Large: the released large_vox_iter5.pt
            enc_params["video"], dims["video"] = sum(p.numel() for p in venc.parameters()), venc.dim
        model = build_model(cfg, dims["audio"], dims["video"], rates=rates, llm=(llm, tok))
    return model, enc_params
