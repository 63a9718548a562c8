"""Frozen Whisper audio encoder, loaded through transformers' `from_pretrained`.

Whisper's encoder insists on 30 s of log-mel (3000 frames). Two ways to encode shorter speech:
  faithful: pad to 30 s as Whisper was trained, run the model, keep the frames of the true length;
  fast:     drive the conv stem and layers directly on the true length, with the positional
            embeddings sliced to it (design.md, "Whisper and Llama").
`normalize` scales each waveform to zero mean and unit variance before the log-mel, as the
reference code does for training and test (a layer norm over the whole clip, eps 1e-8); without
it the raw waveform goes in, as Whisper itself was trained.
Output: 50 tokens per second of audio, (T, d_model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..clocks import AUDIO_HZ, SAMPLE_RATE, SAMPLES_PER_AUDIO_FRAME, audio_frames
from ..errors import MavsrError

WINDOW_TOKENS = 30 * AUDIO_HZ  # Whisper's window: 30 s, 1500 encoder frames


class WhisperAudioEncoder(nn.Module):
    def __init__(self, extractor, encoder, mode: str = "fast", normalize: bool = False) -> None:
        super().__init__()
        self.extractor = extractor
        self.encoder = encoder.eval().requires_grad_(False)
        self.mode = mode
        self.normalize = normalize
        self.dim = encoder.config.d_model

    @classmethod
    def from_config(cls, path: str, cfg) -> WhisperAudioEncoder:
        """The encoder an `audio_encoder:` config section describes, loaded from `path` (its resolved path)."""
        return cls.load(path, cfg.mode, cfg.normalize)

    @classmethod
    def load(cls, name_or_path: str, mode: str = "fast", normalize: bool = False) -> WhisperAudioEncoder:
        from transformers import WhisperFeatureExtractor, WhisperModel

        try:
            extractor = WhisperFeatureExtractor.from_pretrained(name_or_path)
            # WhisperModel maps both hub layouts (WhisperModel and ...ForConditionalGeneration
            # checkpoints); WhisperEncoder.from_pretrained would silently leave weights random.
            model, info = WhisperModel.from_pretrained(name_or_path, output_loading_info=True)
        except OSError as e:
            raise MavsrError(f"cannot load Whisper from {name_or_path!r}: {str(e).splitlines()[0]}") from None
        missing = [k for k in info["missing_keys"] if k.startswith("encoder.")]
        if missing:
            raise MavsrError(f"Whisper checkpoint {name_or_path!r} lacks encoder weights: {', '.join(missing[:3])}")
        encoder = model.encoder
        del model  # the decoder is not needed
        return cls(extractor, encoder, mode, normalize)

    @staticmethod
    def tiny(out_dir: Path, d_model: int = 128, layers: int = 2, heads: int = 4, seed: int = 0,
             pretrain=None) -> Path:
        """Build a small random Whisper from a config and save it in the real on-disk format.

        `pretrain(encoder_wrapper)`, if given, trains the encoder before it is saved.
        """
        from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

        torch.manual_seed(seed)
        cfg = WhisperConfig(
            num_mel_bins=80, d_model=d_model, encoder_layers=layers, decoder_layers=1,
            encoder_attention_heads=heads, decoder_attention_heads=heads,
            encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, vocab_size=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            max_source_positions=1500, max_target_positions=64,
        )
        model = WhisperForConditionalGeneration(cfg)
        extractor = WhisperFeatureExtractor(feature_size=80)
        if pretrain is not None:
            wrapper = WhisperAudioEncoder(extractor, model.model.encoder)
            wrapper.encoder.requires_grad_(True)
            pretrain(wrapper)
        model.save_pretrained(out_dir)  # the hub's layout
        extractor.save_pretrained(out_dir)
        return Path(out_dir)

    def forward(self, wav: np.ndarray) -> torch.Tensor:
        """One utterance of 16 kHz mono float audio -> (T, d_model) at 50 Hz."""
        n_tokens = audio_frames(len(wav))  # 10 ms mel hop, then stride-2 conv: 20 ms per token
        enc = self.encoder
        dev = enc.conv1.weight.device
        if self.mode == "faithful":  # 30 s windows, each padded as Whisper was trained; never cut
            x, outs = self.prepared(wav), []
            for start in range(0, n_tokens, WINDOW_TOKENS):
                piece = x[start * SAMPLES_PER_AUDIO_FRAME: (start + WINDOW_TOKENS) * SAMPLES_PER_AUDIO_FRAME]
                mel = self.window_mel(piece, prepared=True)
                keep = min(WINDOW_TOKENS, n_tokens - start)
                outs.append(self.encode_windows(mel.to(dev, enc.conv1.weight.dtype), keep)[0])
            return torch.cat(outs)
        return self.encode_mel(self.mel(wav))

    def encode_windows(self, mel: torch.Tensor, keep: int) -> torch.Tensor:
        """The faithful path: 30 s log-mel windows (B, 80, 3000) -> their first `keep` frames (B, keep, D).

        Every layer but the last runs on the whole window, as Whisper does; the last one computes
        its queries, feed-forward and output only for the frames kept (its keys and values still
        come from the whole window), the same numbers with a fraction of that layer's work."""
        enc = self.encoder
        h = nn.functional.gelu(enc.conv2(nn.functional.gelu(enc.conv1(mel)))).permute(0, 2, 1)  # (B, 1500, D)
        h = h + enc.embed_positions.weight[: h.shape[1]]
        for layer in enc.layers[:-1]:
            h = layer(h, None)
        last = enc.layers[-1]
        a, x = last.self_attn, last.self_attn_layer_norm(h)
        b, t, d = x.shape

        def heads(y):  # (B, n, D) -> (B, H, n, D/H)
            return y.view(b, -1, a.num_heads, d // a.num_heads).transpose(1, 2)

        q, k, v = heads(a.q_proj(x[:, :keep])), heads(a.k_proj(x)), heads(a.v_proj(x))
        y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, keep, d)
        h = h[:, :keep] + a.out_proj(y)
        h = h + last.fc2(last.activation_fn(last.fc1(last.final_layer_norm(h))))
        return enc.layer_norm(h)

    @property
    def batch_invariant(self) -> bool:
        """Whether a clip's features are the same to the bit in any batch: faithful clips are each
        one padded 30 s window, on the CPU (tested). A GPU's kernels may change with the batch size,
        so there each clip is encoded alone: a cache or a served transcript then never depends on
        what else was encoded with it."""
        return self.mode == "faithful" and self.encoder.conv1.weight.device.type == "cpu"

    def encode_batch(self, wavs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Several utterances in one encoder call -> ((B, T, d_model) zero-padded, lengths (B,)); each
        row equals `forward` of its utterance within fp32 tolerance (tested). faithful: one batch of
        30 s windows; fast: the masked batch of `encode_mels`."""
        lens = [audio_frames(len(w)) for w in wavs]
        if self.mode != "faithful":
            h, n = self.encode_mels([self.mel(w) for w in wavs])
            return _zero_padding(h, n), n
        if max(lens) > WINDOW_TOKENS:  # a clip of several windows: each clip on its own
            outs = [self(w) for w in wavs]
            h = torch.zeros(len(outs), max(lens), self.dim, dtype=outs[0].dtype, device=outs[0].device)
            for b, o in enumerate(outs):
                h[b, : len(o)] = o
            return h, torch.tensor(lens, device=h.device)
        enc = self.encoder
        mel = torch.cat([self.window_mel(w) for w in wavs])  # (B, 80, 3000)
        h = self.encode_windows(mel.to(enc.conv1.weight.device, enc.conv1.weight.dtype), max(lens))
        n = torch.tensor(lens, device=h.device)
        return _zero_padding(h, n), n

    def window_mel(self, wav: np.ndarray, prepared: bool = False) -> torch.Tensor:
        """Whisper's log-mel of one clip of at most 30 s, padded to the window: (1, 80, 3000). One
        extractor call per clip: given a list, the extractor returns the same numbers 2.4x slower
        (8 clips, 2 threads: 111 against 46 ms; benchmarks/vs_authors.md, 2026-12-04)."""
        x = wav if prepared else self.prepared(wav)
        return self.extractor(x, sampling_rate=SAMPLE_RATE, return_tensors="pt", device="cpu").input_features

    def prepared(self, wav: np.ndarray) -> np.ndarray:
        """The waveform the log-mel is taken of: as it is, or normalised over the clip (`normalize`)."""
        if not self.normalize:
            return wav
        x = np.asarray(wav, dtype=np.float64)
        return ((x - x.mean()) / np.sqrt(x.var() + 1e-8)).astype(np.float32)

    def mel(self, wav: np.ndarray) -> torch.Tensor:
        """Whisper log-mel of the true length, (80, 2 * tokens)."""
        n_tokens = audio_frames(len(wav))
        mel = self.extractor(self.prepared(wav), sampling_rate=SAMPLE_RATE, return_tensors="pt",
                             padding="longest", truncation=False).input_features  # (1, 80, frames)
        return mel[0, :, : 2 * n_tokens]

    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """The fast path: (80, F) log-mel -> (F/2, d_model), positions sliced to the true length."""
        return self.encode_mels([mel])[0][0]

    def encode_mels(self, mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The fast path on a batch: B log-mels (80, F_b) -> ((B, T, d_model), lengths (B,)), T the
        longest F_b / 2. Each row equals `encode_mel` of its mel on its first F_b / 2 frames: the
        mels are padded with zeros, as the convolutions pad their edges, and the attention does not
        look at the padded frames (measured: at most 1e-6 apart)."""
        enc = self.encoder
        w = enc.conv1.weight
        longest = max(m.shape[-1] for m in mels)
        if longest > 2 * enc.embed_positions.num_embeddings:
            raise MavsrError(f"audio of {longest / 100:.1f} s is longer than Whisper's 30 s window")
        x = torch.zeros(len(mels), mels[0].shape[0], longest + longest % 2, dtype=w.dtype, device=w.device)
        for b, m in enumerate(mels):
            x[b, :, : m.shape[-1]] = m
        lens = torch.tensor([m.shape[-1] // 2 for m in mels], device=w.device)
        h = nn.functional.gelu(enc.conv1(x))
        h = nn.functional.gelu(enc.conv2(h)).permute(0, 2, 1)  # (B, T, D)
        h = h + enc.embed_positions.weight[: h.shape[1]]
        mask = None
        if len(mels) > 1:  # additive (B, 1, T, T): padded key frames get -inf
            pad = torch.arange(h.shape[1], device=w.device)[None] >= lens[:, None]
            mask = torch.zeros(len(mels), 1, h.shape[1], h.shape[1], dtype=h.dtype, device=w.device)
            mask.masked_fill_(pad[:, None, None, :], float("-inf"))
        for layer in enc.layers:
            h = layer(h, mask)
        return enc.layer_norm(h), lens


def _zero_padding(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, D) with the frames past each row's length set to zero, as `pad_batch` leaves them."""
    keep = torch.arange(h.shape[1], device=h.device)[None] < lengths[:, None]
    return h * keep[..., None].to(h.dtype)
