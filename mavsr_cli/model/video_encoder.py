"""A small frozen lip encoder for the synthetic recipe (the AV-HuBERT reader comes in issue 3).

Same interface as the AV-HuBERT video encoder: (T, H, W) normalised mouth crops at 25 fps ->
(T, dim) at 25 Hz. Shape: a 2x spatial average pool (for CPU cost), a 3-D conv stem (5x7x7, as
AV-HuBERT's), a 2-D conv per frame, a 4x4 spatial pool, a linear map and a few transformer layers.
Stored as a mavsr model directory:
`config.json` + `model.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import MavsrError


@dataclass(frozen=True)
class SmallVideoEncoderConfig:
    kind: str = "small-video-encoder"
    channels: int = 16  # conv channels
    dim: int = 128  # output width
    layers: int = 2  # transformer layers
    heads: int = 4  # attention heads


class SmallVideoEncoder(nn.Module):
    def __init__(self, cfg: SmallVideoEncoderConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.dim = cfg.dim
        self.stem = nn.Sequential(
            nn.AvgPool3d((1, 2, 2)),
            nn.Conv3d(1, c, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3)), nn.BatchNorm3d(c), nn.PReLU(c)
        )
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.PReLU(c))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Linear(c * 16, cfg.dim)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 4 * cfg.dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, H, W) float, normalised -> (T, dim)."""
        return self._encode(frames[None, None], None)[0]

    def encode_batch(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Several clips in one call -> ((B, T, dim) zero-padded, lengths (B,)); zero frames pad as the
        stem's convolution does and the attention masks them, so each row equals `forward`'s."""
        lens = torch.tensor([c.shape[0] for c in clips])
        x = torch.zeros(len(clips), 1, int(lens.max()), *clips[0].shape[1:], dtype=clips[0].dtype,
                        device=clips[0].device)
        for b, c in enumerate(clips):
            x[b, 0, : c.shape[0]] = c
        pad = (torch.arange(x.shape[2])[None] >= lens[:, None]).to(x.device)  # (B, T) True = padding
        h = self._encode(x, pad if len(clips) > 1 else None)
        return h.masked_fill(pad[..., None], 0.0), lens

    def _encode(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """(B, 1, T, H, W) -> (B, T, dim)."""
        b, t = x.shape[0], x.shape[2]
        x = self.stem(x)  # (B, C, T, H/4, W/4)
        x = x.transpose(1, 2).reshape(b * t, *x.shape[1:2], *x.shape[3:])  # (B*T, C, H/4, W/4)
        x = self.proj(self.pool(self.conv(x)).reshape(b, t, -1))  # (B, T, dim)
        return self.norm(self.encoder(x, src_key_padding_mask=pad))

    def save(self, out_dir: Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / "model.safetensors"))
        return out

    @classmethod
    def load(cls, path: str | Path) -> SmallVideoEncoder:
        p = Path(path)
        if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
            raise MavsrError(f"no video encoder at {p} (expected config.json and model.safetensors)")
        raw = json.loads((p / "config.json").read_text())
        if raw.get("kind") != SmallVideoEncoderConfig.kind:
            raise MavsrError(f"{p}/config.json is not a {SmallVideoEncoderConfig.kind} (kind={raw.get('kind')!r})")
        model = cls(SmallVideoEncoderConfig(**raw))
        state = load_file(str(p / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MavsrError(f"video encoder {p}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        return model.eval().requires_grad_(False)

    @staticmethod
    def tiny(out_dir: Path, seed: int = 0, pretrain=None, **kw) -> Path:
        """Build from a config, optionally train with `pretrain(model)`, save frozen."""
        torch.manual_seed(seed)
        model = SmallVideoEncoder(SmallVideoEncoderConfig(**kw))
        if pretrain is not None:
            pretrain(model)
        return model.eval().save(out_dir)


def load_video_encoder(path: str | Path) -> nn.Module:
    """A video encoder from a fairseq AV-HuBERT checkpoint (a .pt file) or a mavsr model dir."""
    p = Path(path)
    if p.is_file():
        from .avhubert import AVHubertVideoEncoder

        return AVHubertVideoEncoder.load(p)
    return SmallVideoEncoder.load(p)
