"""The authors' model, written down for tests: what their code computes at test time, and their
checkpoint layout, over tiny parts (their code itself needs 2024-pinned libraries and fairseq).

Written from umbertocappellazzo/Omni-AVSR @7de6be2 (Omni_AVSR/modeling_LlamaAVSR.py,
Omni_AVSR/Llama_LoRA.py, datamodule/transforms.py, utils/avg_checkpoints.py) and
umbertocappellazzo/Llama-AVSR @410842d (models/modeling_AVSRLLM.py), read, not copied:

- audio: with video, first cut or zero-padded to 640 samples per video frame (datamodule/av_dataset.py);
  the waveform layer-normed over the clip (eps 1e-8) -> WhisperFeatureExtractor (padded to 30 s)
  -> Whisper encoder -> the first max(int(n / 16000 * 50), 25) frames (clips here are over 0.5 s)
- video: AV-HuBERT's final layer on the normalised 88x88 crops; with --use-lora-avhubert,
  q += 2 * up_Q(down_Q(x)) and v += 2 * up_V(down_V(x)) in every layer; BatchNorm statistics are
  whatever training left (here: random, not the pretrained file's)
- compression before the projector: nn.AvgPool1d(rate) over time (a trailing partial group
  dropped), or r consecutive frames concatenated (stack)
- projector[rate]: Linear -> ReLU -> Linear [-> LayerNorm]; Matryoshka: a ModuleList by rate position
- the LLM: Llama with five rows added to the vocabulary (<pad> <audio> </audio> <video> </video>),
  LoRA on q_proj and v_proj: q = q_proj(x) + lora_up_Q(lora_down_Q(x)) * alpha / rank_arg
- input: [BOS] <audio> A </audio> <video> V </video> prompt tokens (no BOS/EOS around the prompt);
  the markers are the added rows of the embedding; greedy picks the argmax over the whole vocabulary
- saved: the module's state_dict (prefix "model." in a Lightning .ckpt, stripped in model_avg_N.pth)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ADDED = ["<pad>", "<audio>", "</audio>", "<video>", "</video>"]


def _projector(in_dim: int, hidden: int, out: int, layernorm: bool) -> nn.Sequential:
    layers = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out)]
    return nn.Sequential(*(layers + [nn.LayerNorm(out)] if layernorm else layers))


def _lora(module: nn.Module, proj: str, width: int, out: int, r: int, scale: float, tag: str, init: float) -> None:
    """Their LoRA on one projection: two bias-free linears beside it, added to its output."""
    down, up = nn.Linear(width, r, bias=False), nn.Linear(r, out, bias=False)
    nn.init.normal_(down.weight, std=init)
    nn.init.normal_(up.weight, std=init)
    module.add_module(f"lora_down_{tag}", down)
    module.add_module(f"lora_up_{tag}", up)
    getattr(module, proj).register_forward_hook(lambda m, inp, y: y + up(down(inp[0])) * scale)


class AuthorsAVSR(nn.Module):
    """Their AVSR_LLMs module at test time, with their attribute names (so their state-dict keys)."""

    def __init__(self, llm, tokenizer, whisper_encoder, extractor, video_encoder, audio_rates, video_rates,
                 matryoshka: bool = True, layernorm: bool = True, compression: str = "avg", hidden: int = 48,
                 reduction: int = 4, alpha: float = 0.5, avhubert_lora: bool = True, seed: int = 0,
                 added: tuple[str, ...] = tuple(ADDED)) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tokenizer, self.extractor = tokenizer, extractor
        self.base_vocab = llm.get_input_embeddings().weight.shape[0]
        # their tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": [...]}): on a
        # Llama 3 vocabulary (no pad token) five new ids after the LLM's, in this order; four where a pad exists
        self.ids = {t: self.base_vocab + i for i, t in enumerate(added)}
        llm.resize_token_embeddings(self.base_vocab + len(added), mean_resizing=False)
        with torch.no_grad():  # their added rows: random, never trained
            llm.get_input_embeddings().weight[self.base_vocab:] = torch.randn(len(added), llm.config.hidden_size) * 0.02
        self.llm = llm
        self.audio_encoder, self.video_encoder = whisper_encoder, video_encoder
        self.rates = {"audio": list(audio_rates), "video": list(video_rates)}
        self.compression, self.matryoshka = compression, matryoshka
        width = llm.config.hidden_size
        for stream, enc in (("audio", whisper_encoder), ("video", video_encoder)):
            rates = self.rates[stream]
            if not rates:
                continue
            dim = enc.config.d_model if stream == "audio" else enc.dim
            make = [_projector(dim * (r if compression == "stack" else 1), hidden, width, layernorm) for r in rates]
            setattr(self, f"{stream}_proj", nn.ModuleList(make) if matryoshka else make[0])
        self._add_llm_lora(width // reduction, alpha / reduction)
        if avhubert_lora and video_encoder is not None:
            for layer in video_encoder.encoder.layers:
                d = layer.self_attn.q_proj.weight.shape[0]
                for tag in ("Q", "V"):
                    _lora(layer.self_attn, f"{tag.lower()}_proj", d, d, max(1, d // 16), 2.0, tag, 0.05)
        if video_encoder is not None:  # BatchNorm statistics moved by training in train mode
            for m in video_encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)

    def _add_llm_lora(self, r: int, scale: float) -> None:
        cfg = self.llm.config
        kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
        for layer in self.llm.model.layers:
            _lora(layer.self_attn, "q_proj", cfg.hidden_size, cfg.hidden_size, r, scale, "Q", 0.05)
            _lora(layer.self_attn, "v_proj", cfg.hidden_size, kv, r, scale, "V", 0.05)

    # ---- their test-time forward ---------------------------------------------------------------
    def audio_features(self, wav: np.ndarray, video_frames: int | None = None) -> torch.Tensor:
        if video_frames is not None:  # their cut_or_pad of AV samples
            n = video_frames * 640
            wav = wav[:n] if len(wav) >= n else np.pad(wav, (0, n - len(wav)))
        x = torch.nn.functional.layer_norm(torch.from_numpy(wav).float(), (len(wav),), eps=1e-8)
        mel = self.extractor(x.numpy(), return_tensors="pt", sampling_rate=16000).input_features
        out = self.audio_encoder(mel).last_hidden_state
        return out[:, : max(int(len(wav) / 16000 * 50), 25)]  # (1, T, D)

    def _compress(self, x: torch.Tensor, rate: int) -> torch.Tensor:
        if self.compression == "avg":
            return nn.AvgPool1d(rate)(x.transpose(1, 2)).transpose(1, 2)
        t = x.shape[1] // rate * rate
        return x[:, :t].reshape(x.shape[0], t // rate, -1)

    def _block(self, stream: str, x: torch.Tensor, rate: int) -> torch.Tensor:
        proj = getattr(self, f"{stream}_proj")
        if self.matryoshka:
            proj = proj[self.rates[stream].index(rate)]
        return proj(self._compress(x, rate))

    def embeddings(self, audio, video, rates: tuple, prompt: str) -> torch.Tensor:
        """(1, L, D): [BOS] <audio> A </audio> <video> V </video> prompt."""
        emb = self.llm.get_input_embeddings()
        tok = lambda ids: emb(torch.tensor([ids]))  # noqa: E731
        parts = [tok([self.tokenizer.bos_token_id])]
        if audio is not None:
            parts += [tok([self.ids["<audio>"]]), self._block("audio", audio, rates[0]), tok([self.ids["</audio>"]])]
        if video is not None:
            v = self.video_encoder(video)[None]
            parts += [tok([self.ids["<video>"]]), self._block("video", v, rates[1]), tok([self.ids["</video>"]])]
        parts.append(tok(self.tokenizer(prompt, add_special_tokens=False).input_ids))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def greedy(self, emb: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Argmax over their whole vocabulary, one token at a time, until EOS."""
        out = []
        for _ in range(max_new_tokens):
            nxt = int(self.llm(inputs_embeds=emb).logits[0, -1].argmax())
            if nxt == self.tokenizer.eos_token_id:
                break
            out.append(nxt)
            emb = torch.cat([emb, self.llm.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
        return out

    def checkpoint_state(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """model_avg_N.pth: every tensor of the module, as their averaging script saves it (AV-HuBERT
        with its pre-training heads and audio front end, as the fairseq model holds them)."""
        state = {k: v.detach().clone().to(dtype) for k, v in self.state_dict().items()}
        if self.video_encoder is not None:
            d = self.video_encoder.dim
            for k, shape in (("final_proj.weight", (8, d)), ("mask_emb", (d,)),
                             ("feature_extractor_audio.proj.weight", (d, 104))):
                state[f"video_encoder.{k}"] = torch.zeros(shape, dtype=dtype)
        return state
