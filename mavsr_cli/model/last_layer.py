"""The LLM's last decoder layer computed only where the training loss reads its output (issue 21).

The loss reads the last hidden state at the transcript and EOS positions only (a sixth of a row, or
less, beside the media and the prompt). Every earlier layer is needed at every position (its
keys and values feed what follows), but the last one's keys and values are all it owes the other
positions: its query, attention output, o_proj and MLP are needed only at the positions read. So,
for one forward pass, the last layer runs its keys and values over the whole row and everything
else over a window of query positions per row; the rows' other outputs are zeros, never read.
The same sums as the full layer, to float rounding (tested against it).

Llama's layer only (Llama 3 is what mavsr adapts); another architecture runs its full layer.
"""

from __future__ import annotations

import contextlib
import types

import torch

from . import attention

MASK_KINDS = ("sdpa", "eager", attention.NAME)  # the masks _mask_rows can make (flash/flex kernels take others)


def query_windows(keep: torch.Tensor) -> torch.Tensor:
    """keep (B, T) True where the loss reads a position -> (B, Q) positions, one window per row that
    holds every kept position (Q: the widest row's span), within [0, T)."""
    b, t = keep.shape
    pos = torch.arange(t, device=keep.device).expand(b, t)
    last = torch.where(keep, pos, -1).amax(1)  # (B,)
    first = torch.where(keep, pos, t).amin(1).clamp(max=t - 1)
    q = int((last - first).clamp(min=0).max()) + 1
    start = (last.clamp(min=0) - q + 1).clamp(min=0)  # ends at the last kept position, or starts at 0
    return start[:, None] + torch.arange(q, device=keep.device)  # (B, Q)


def _decoder_layer(decoder):
    try:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    except ImportError:  # pragma: no cover  (every supported transformers has it)
        return None
    layer = decoder.layers[-1]
    plain = "forward" not in layer.__dict__  # no hook has replaced its forward (accelerate's device maps do)
    ok = isinstance(layer, LlamaDecoderLayer) and decoder.config._attn_implementation in MASK_KINDS and plain
    return layer if ok else None


@contextlib.contextmanager
def last_layer_at(decoder, positions: torch.Tensor):
    """Within the block, `decoder`'s (a LlamaModel's) last layer computes its outputs only at
    `positions` (B, Q); elsewhere they are zeros. Yields whether it does (False: another
    architecture, whose full layer runs)."""
    layer = _decoder_layer(decoder)
    if layer is None:
        yield False
        return

    def forward(self, hidden_states, **kwargs):
        return _forward_at(self, hidden_states, positions, **kwargs)

    layer.forward = types.MethodType(forward, layer)
    try:
        yield True
    finally:
        del layer.forward  # the class's forward again


def _rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) -> (B, Q, ...) at positions (B, Q); x may broadcast over the batch (B = 1)."""
    x = x.expand(positions.shape[0], *x.shape[1:])
    idx = positions.reshape(*positions.shape, *([1] * (x.dim() - 2))).expand(*positions.shape, *x.shape[2:])
    return x.gather(1, idx)


def _mask_rows(mask, positions: torch.Tensor, t: int):
    """The attention mask's rows of the query positions: (B, 1, Q, T). None (sdpa's causal rows,
    no padding) becomes a boolean mask; the eager kernel always has its additive one."""
    if mask is None:
        keys = torch.arange(t, device=positions.device)
        return keys[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, Q, T)
    m = mask.expand(positions.shape[0], *mask.shape[1:])  # (B, 1, T, T)
    return m.gather(2, positions[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))


def _forward_at(layer, hidden_states, positions, attention_mask=None, position_embeddings=None, **kwargs):
    """LlamaDecoderLayer.forward's sums with queries only at `positions` (no cache: training)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    attn = layer.self_attn
    b, t, _ = hidden_states.shape
    q_len = positions.shape[1]
    x = layer.input_layernorm(hidden_states)  # (B, T, D)
    q = attn.q_proj(_rows(x, positions)).view(b, q_len, -1, attn.head_dim).transpose(1, 2)  # (B, H, Q, hd)
    k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
    v = attn.v_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings  # (B or 1, T, hd)
    q, _ = apply_rotary_pos_emb(q, q, _rows(cos, positions), _rows(sin, positions))
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = fn(attn, q, k, v, _mask_rows(attention_mask, positions, t),
                dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling)
    h = _rows(hidden_states, positions) + attn.o_proj(out.reshape(b, q_len, -1))  # (B, Q, D)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    full = h.new_zeros(b, t, h.shape[-1])
    return full.scatter(1, positions[..., None].expand(-1, -1, h.shape[-1]), h)  # (B, T, D)
