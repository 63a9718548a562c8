"""The rate configurations of a shared-LoRA (MS) training step in one LLM pass, their rows merged
(issue 21).

With one shared LoRA every configuration runs the same weights, and a Llama layer is row by row
but for its attention: the norms, the q/k/v/o projections (and their LoRA), the MLP and the
residual adds. So the configurations' sequences, each (B, L_c) with its own length, are flattened
and stacked into one (R, D) residual stream of R = sum B x L_c rows: each of those operations runs
once on R rows instead of once per configuration, and only the attention (with the rotary
embedding before it) is split back per configuration, (B, H, L_c, hd) with that configuration's
mask. No padding is added, unlike a batch padded to the longest configuration: the rows are the
unmerged passes' rows. On this 2-core CPU a layer's products (forward and input gradient, 40
interleaved rounds) ran 1.22x faster at 472 rows than at 320 and 152 (rates 4 and 16, batch 4), and
each row-wise operator is called once instead of once per configuration.

The last layer computes its queries, attention output and MLP only at the query windows the loss
reads (as last_layer.py does for one configuration). The output layer runs configuration by
configuration (avsr.py): over every configuration's read rows at once, its backward's (rows,
vocabulary) gradient was one transient, 1.5x the step's peak at Llama-3.2-1B size.

The same sums as separate passes, to float rounding, where nothing random runs (tested at LoRA
dropout 0): the attention calls are the same;
a product's rows are each the same dot products (bit for bit with MKL from some 50 rows up; not
at a handful), and a weight's gradient adds every configuration's rows in one reduction. With LoRA
dropout, one mask is drawn over all rows where separate passes draw one per configuration: the
same dropout, other draws, so a merged step's losses are not a per-configuration step's (each is
still reproducible from its seed).

Llama's plain layers only, and only where nothing wraps them: gradient checkpointing and FSDP's
per-layer hooks act on a layer's call, which this pass does not make (`mergeable`): such steps run
their configurations in separate passes, as before, `train.pack_rates` included.
"""

from __future__ import annotations

import torch

from . import last_layer, step


def mergeable(decoder) -> bool:
    """Whether `decoder` (a LlamaModel) can run merged: plain Llama layers that nothing hooks (FSDP's
    gathers, accelerate's device moves, PyTorch's global hooks: step.py's test, and backward hooks)
    or checkpoints, and an attention whose masks this pass builds. The pass calls a layer's parts on
    (rows, D) matrices, never the layer or its attention, so anything hung on those calls would be
    skipped, and a hook on a part would see other shapes than the layer's call gives it."""
    try:
        from torch.nn.modules import module as torch_module
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer
    except ImportError:  # pragma: no cover
        return False
    if decoder.config._attn_implementation not in last_layer.MASK_KINDS:
        return False
    if getattr(decoder, "gradient_checkpointing", False) or torch_module._global_backward_hooks \
            or torch_module._global_backward_pre_hooks:
        return False
    for layer in _layers(decoder):
        if not isinstance(layer, LlamaDecoderLayer) or getattr(layer, "gradient_checkpointing", False) \
                or step._hooked(layer):
            return False
        for m, cls in ((layer, LlamaDecoderLayer), (layer.self_attn, LlamaAttention)):
            if type(m).forward is not cls.forward or m._backward_hooks or m._backward_pre_hooks:
                return False
    return True


def _layers(decoder):
    return decoder.layers[: decoder.config.num_hidden_layers]  # as LlamaModel.forward runs them


class _Piece:
    """One configuration's place in the merged rows: its (B, L) shape, mask, rotary table, and the
    rows of its query windows (for the last layer)."""

    def __init__(self, decoder, emb: torch.Tensor, mask: torch.Tensor, windows: torch.Tensor, start: int) -> None:
        from transformers.masking_utils import create_causal_mask

        self.b, self.t = emb.shape[:2]
        self.start, self.rows = start, self.b * self.t
        pos = torch.arange(self.t, device=emb.device)[None]
        self.mask = create_causal_mask(config=decoder.config, inputs_embeds=emb, attention_mask=mask,
                                       cache=None, position_ids=pos)
        self.cos, self.sin = decoder.rotary_emb(emb, position_ids=pos)  # (1, L, hd)
        self.windows = windows  # (B, Q) positions
        # the windows' rows in the merged stream
        self.flat = (start + torch.arange(self.b, device=emb.device)[:, None] * self.t + windows).reshape(-1)


def _attend(attn, q, k, v, mask):
    """The layer's attention kernel, as LlamaAttention calls it -> (B, Q, H * hd)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    fn = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = fn(attn, q, k, v, mask, dropout=0.0 if not attn.training else attn.attention_dropout,
                scaling=attn.scaling)
    return out.reshape(q.shape[0], q.shape[2], -1)


def _heads(x: torch.Tensor, p: _Piece, hd: int, q: int | None = None) -> torch.Tensor:
    """(B*Q, H*hd) rows of one configuration -> (B, H, Q, hd)."""
    return x.view(p.b, q or p.t, -1, hd).transpose(1, 2)


def _layer(layer, h: torch.Tensor, pieces: list[_Piece]) -> torch.Tensor:
    """A full Llama layer over the merged rows h (R, D) -> (R, D)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    hd = attn.head_dim
    x = layer.input_layernorm(h)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)  # (R, H*hd), (R, Hkv*hd) x 2
    outs = []
    for p in pieces:
        sl = slice(p.start, p.start + p.rows)
        qp, kp = apply_rotary_pos_emb(_heads(q[sl], p, hd), _heads(k[sl], p, hd), p.cos, p.sin)
        outs.append(_attend(attn, qp, kp, _heads(v[sl], p, hd), p.mask).reshape(p.rows, -1))
    h = h + attn.o_proj(torch.cat(outs))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _last_layer(layer, h: torch.Tensor, pieces: list[_Piece]) -> torch.Tensor:
    """The last layer, its outputs only at the pieces' query windows -> (sum B*Q, D), piece by piece."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    hd = attn.head_dim
    x = layer.input_layernorm(h)
    k, v = attn.k_proj(x), attn.v_proj(x)  # (R, Hkv*hd)
    flat = torch.cat([p.flat for p in pieces])
    q = attn.q_proj(x.index_select(0, flat))  # (sum B*Q, H*hd)
    outs, at = [], 0
    for p in pieces:
        sl, n = slice(p.start, p.start + p.rows), p.windows.numel()
        qw = _heads(q[at:at + n], p, hd, p.windows.shape[1])
        # queries and keys sit at other positions: each rotated alone, by transformers' function as
        # last_layer.py does (a patched or hub-kernel rotary is then used by both)
        qw, _ = apply_rotary_pos_emb(qw, qw, last_layer._rows(p.cos, p.windows), last_layer._rows(p.sin, p.windows))
        _, kp = apply_rotary_pos_emb(_heads(k[sl], p, hd), _heads(k[sl], p, hd), p.cos, p.sin)
        mask = last_layer._mask_rows(p.mask, p.windows, p.t)
        outs.append(_attend(attn, qw, kp, _heads(v[sl], p, hd), mask).reshape(n, -1))
        at += n
    y = h.index_select(0, flat) + attn.o_proj(torch.cat(outs))
    return y + layer.mlp(layer.post_attention_layernorm(y))


def hidden_at_windows(decoder, inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """inputs: per configuration (inputs_embeds (B, L_c, D), attention_mask (B, L_c), query windows
    (B, Q_c)) -> per configuration the final hidden states at its windows (B, Q_c, D), normed as the
    decoder's output is."""
    pieces, start = [], 0
    for emb, mask, windows in inputs:
        pieces.append(_Piece(decoder, emb, mask, windows, start))
        start += pieces[-1].rows
    h = torch.cat([emb.reshape(-1, emb.shape[-1]) for emb, _, _ in inputs])  # (R, D)
    *layers, last = _layers(decoder)
    for layer in layers:
        h = _layer(layer, h, pieces)
    y = decoder.norm(_last_layer(last, h, pieces))  # (sum B*Q, D)
    return [w.view(p.b, p.windows.shape[1], -1) for w, p in zip(y.split([p.windows.numel() for p in pieces]),
                                                                pieces, strict=True)]
