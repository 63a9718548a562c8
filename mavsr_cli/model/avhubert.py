"""AV-HuBERT's video encoder in plain PyTorch, reading fairseq checkpoints without fairseq.

Video-only forward as the original `extract_finetune` does it (formats.md, "AV-HuBERT checkpoint"):
  mouth crops (B, 1, T, 88, 88)
  -> feature_extractor_video.resnet: 3-D stem (conv 5x7x7 /1,2,2 + BN + PReLU, max-pool 1x3x3 /1,2,2)
     then a ResNet-18 trunk (BasicBlocks with PReLU, [2, 2, 2, 2]) per frame, global average pool
  -> feature_extractor_video.proj: 512 -> D
  -> concatenated with zeros for the absent audio (modality_fuse: concat) -> layer_norm (2D)
  -> post_extract_proj: 2D -> D
  -> encoder: x + pos_conv(x) (weight-normed conv, kernel 128, 16 groups, GELU), pre-LN
     transformer layers, final encoder.layer_norm
Output: (T, D) at 25 Hz. State-dict keys are the checkpoint's own, so loading is one strict
`load_state_dict` after dropping the pre-training heads and the audio front end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..errors import MavsrError
from ..safe_pickle import load_checkpoint

# tensors of the checkpoint that a video-only extractor does not use
UNUSED_PREFIXES = ("final_proj.", "label_embs_concat", "mask_emb", "feature_extractor_audio.")


@dataclass(frozen=True)
class AVHubertConfig:
    encoder_layers: int = 24  # Large: 24, Base: 12
    encoder_embed_dim: int = 1024  # Large: 1024, Base: 768
    encoder_ffn_embed_dim: int = 4096  # Large: 4096, Base: 3072
    encoder_attention_heads: int = 16  # Large: 16, Base: 12
    conv_pos: int = 128  # kernel of the convolutional relative positions
    conv_pos_groups: int = 16  # groups of that convolution
    resnet_channels: int = 64  # channels of the 3-D stem and the first trunk stage (64 in the release)
    # pre-LN transformer layers and a final norm (every released checkpoint); False: post-LN layers,
    # the norm before them (fairseq's TransformerEncoder reads the same flag)
    layer_norm_first: bool = True

    @classmethod
    def from_checkpoint_cfg(cls, model_cfg) -> "AVHubertConfig":
        """Read the hyper-parameters from cfg['model'] (dict) or an old argparse Namespace."""
        get = model_cfg.get if isinstance(model_cfg, dict) else lambda k, d=None: getattr(model_cfg, k, d)
        kw = {f.name: get(f.name) for f in fields(cls) if get(f.name) is not None}
        return cls(**kw)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.PReLU(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + residual)


class ResNetTrunk(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        widths = [c, 2 * c, 4 * c, 8 * c]
        inplanes = c
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, w, stride), BasicBlock(w, w)))
            inplanes = w
        self.out_dim = widths[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.avgpool(x).flatten(1)  # (N, 8c)


class ResEncoder(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.frontend3D = nn.Sequential(
            nn.Conv3d(1, c, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(c),
            nn.PReLU(c),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.trunk = ResNetTrunk(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t = x.shape[:3]
        x = self.frontend3D(x)  # (B, c, T, H', W')
        x = x.transpose(1, 2).reshape(b * t, *x.shape[1:2], *x.shape[3:])  # (B*T, c, H', W')
        return self.trunk(x).reshape(b, t, -1)  # (B, T, 8c)


class VideoFrontEnd(nn.Module):
    def __init__(self, cfg: AVHubertConfig) -> None:
        super().__init__()
        self.resnet = ResEncoder(cfg.resnet_channels)
        self.proj = nn.Linear(self.resnet.trunk.out_dim, cfg.encoder_embed_dim)


class PosConv(nn.Module):
    """Weight-normed grouped conv (weight_g, weight_v; norm over all dims but the kernel axis)."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(dim, dim // groups, kernel) * math.sqrt(4 / (kernel * dim)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D, T)
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=(0, 1), keepdim=True)
        y = nn.functional.conv1d(x, w, self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:  # "SamePad": an even kernel yields one extra step
            y = y[:, :, :-1]
        return nn.functional.gelu(y)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:  # (B, T, D)
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, D/H) each
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        mask = None if pad is None else ~pad[:, None, None, :]  # True = attend
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """wav2vec 2.0 / AV-HuBERT transformer layer: pre-LN (layer_norm_first) or post-LN."""

    def __init__(self, dim: int, ffn: int, heads: int, pre_ln: bool = True) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.self_attn = SelfAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        if not self.pre_ln:  # norms after each residual sum
            x = self.self_attn_layer_norm(x + self.self_attn(x, pad))
            return self.final_layer_norm(x + self.fc2(nn.functional.gelu(self.fc1(x))))
        x = x + self.self_attn(self.self_attn_layer_norm(x), pad)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.final_layer_norm(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: AVHubertConfig) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(PosConv(d, cfg.conv_pos, cfg.conv_pos_groups))
        self.layers = nn.ModuleList(EncoderLayer(d, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads,
                                                 cfg.layer_norm_first) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        self.pre_ln = cfg.layer_norm_first

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, D)
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.pre_ln:  # post-LN: the encoder's norm comes before the layers
            x = self.layer_norm(x)
        for layer in self.layers:
            x = layer(x, pad)
        return self.layer_norm(x) if self.pre_ln else x  # pre-LN: the final norm comes after the layers


class AVHubertVideoEncoder(nn.Module):
    def __init__(self, cfg: AVHubertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.encoder_embed_dim
        self.dim = d
        self.feature_extractor_video = VideoFrontEnd(cfg)
        self.layer_norm = nn.LayerNorm(2 * d)
        self.post_extract_proj = nn.Linear(2 * d, d)
        self.encoder = Encoder(cfg)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, 88, 88) normalised mouth crops -> (T, D)."""
        return self._encode(frames[None, None], None)[0]

    def encode_batch(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Several clips (T_b, 88, 88) in one call -> ((B, T, D) zero-padded, lengths (B,)). Padding
        frames are zeros, which the 3-D stem and the positional convolution also pad with, and the
        transformer's attention masks them: each row equals `forward` of its clip (tested)."""
        lens = torch.tensor([c.shape[0] for c in clips])
        x = torch.zeros(len(clips), 1, int(lens.max()), *clips[0].shape[1:], dtype=clips[0].dtype,
                        device=clips[0].device)
        for b, c in enumerate(clips):
            x[b, 0, : c.shape[0]] = c
        pad = torch.arange(x.shape[2])[None] >= lens[:, None]  # (B, T) True = padding
        h = self._encode(x, pad.to(x.device) if len(clips) > 1 else None)
        return h.masked_fill(pad[..., None].to(h.device), 0.0), lens

    def _encode(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """(B, 1, T, H, W) crops -> (B, T, D)."""
        video = self.feature_extractor_video.proj(self.feature_extractor_video.resnet(x))  # (B, T, D)
        fused = torch.cat([torch.zeros_like(video), video], dim=-1)  # (B, T, 2D): [audio, video]
        return self.encoder(self.post_extract_proj(self.layer_norm(fused)), pad)

    @classmethod
    def load(cls, path: str | Path) -> "AVHubertVideoEncoder":
        """Read a fairseq AV-HuBERT checkpoint (e.g. large_vox_iter5.pt) without fairseq."""
        ckpt = load_checkpoint(path)
        if "model" not in ckpt:
            raise MavsrError(f"{path}: no 'model' state dict in the checkpoint")
        if isinstance(ckpt.get("cfg"), dict) and "model" in ckpt["cfg"]:
            model_cfg = ckpt["cfg"]["model"]
        elif ckpt.get("args") is not None:
            model_cfg = ckpt["args"]
        else:
            raise MavsrError(f"{path}: neither 'cfg' nor 'args' describes the model")
        cfg = AVHubertConfig.from_checkpoint_cfg(model_cfg)
        model = cls(cfg)
        state = {k: v for k, v in ckpt["model"].items() if not k.startswith(UNUSED_PREFIXES)}
        own = model.state_dict()
        bad = next((k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)), None)
        if bad is not None:
            raise MavsrError(f"{path} does not match its own config ({cfg.encoder_layers} layers, "
                             f"{cfg.encoder_embed_dim} wide): {bad} is {tuple(state[bad].shape)}, "
                             f"the config makes it {tuple(own[bad].shape)}")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MavsrError(f"{path} does not match AV-HuBERT ({cfg.encoder_layers} layers): "
                             f"missing {len(missing)} tensors {missing[:3]}, "
                             f"unexpected {len(unexpected)} {unexpected[:3]}")
        return model.eval().requires_grad_(False)

    def fairseq_state(self) -> dict[str, torch.Tensor]:
        """This encoder's tensors under the checkpoint's names, plus the pre-training heads and
        audio front end a real checkpoint also holds (for writing test checkpoints)."""
        d = self.dim
        state = dict(self.state_dict())
        state.update({
            "final_proj.weight": torch.zeros(256, d), "final_proj.bias": torch.zeros(256),
            "label_embs_concat": torch.zeros(2000, 256), "mask_emb": torch.zeros(d),
            "feature_extractor_audio.proj.weight": torch.zeros(d, 104),
            "feature_extractor_audio.proj.bias": torch.zeros(d),
        })
        return state
