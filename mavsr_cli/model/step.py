"""One search step of the LLM: every row's next-token logits from one new token and its cache (issue 21).

A beam step at 120 rows runs 23 matrix products near this CPU's peak, and around them transformers'
per-call machinery: the model's, decoder layers' and attention's wrappers, output recording, the
mask's checks, and the rotary embedding's cos/sin recomputed for the step's positions. For a Llama
decoder `LlamaStep` calls the same modules in the order `LlamaModel.forward` does (norms, peft's LoRA
projections, `apply_rotary_pos_emb`, the cache's `update`, mavsr's attention, the MLP, the output
layer), with the cos/sin rows read from a table made once by the model's own rotary module, so the
logits are the same numbers as the full call's (tested with `torch.equal`). Any other model, or an
attention other than mavsr's, takes the full call.
"""

from __future__ import annotations

import torch

from . import attention

_STATIC_ROPE = ("default", "llama3", "linear")  # cos/sin depend on the position only: a table holds them


def one_token_step(lm, positions: int):
    """A function (emb (N, 1, D), pos (N,), mask (N, 1, 1, T), cache) -> logits (N, V) for the causal
    LM `lm`; `positions` bounds the positions it will be asked (prompt + generated tokens)."""
    if LlamaStep.fits(lm):
        return LlamaStep(lm, positions)

    def full(emb, pos, mask, cache):
        out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos[:, None], cache=cache, use_cache=True)
        return out.logits[:, -1]
    return full


class LlamaStep:
    """A Llama's forward pass for one token per row, without transformers' per-call machinery."""

    @staticmethod
    def fits(lm) -> bool:
        inner = getattr(lm, "model", None)
        rotary = getattr(inner, "rotary_emb", None)
        return (lm.config.model_type == "llama" and lm.config._attn_implementation == attention.NAME
                and getattr(rotary, "rope_type", None) in _STATIC_ROPE and not lm.training)

    def __init__(self, lm, positions: int) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.lm, self.rope = lm, apply_rotary_pos_emb
        dev = lm.lm_head.weight.device
        table = lm.model.rotary_emb(torch.zeros(1, device=dev), torch.arange(positions, device=dev)[None])
        self.table = [t[0] for t in table]  # cos, sin (positions, head_dim) in float32, as the module computes them
        self.cast: dict[torch.dtype, list[torch.Tensor]] = {}

    def _rotary(self, pos: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        if dtype not in self.cast:  # the module returns cos/sin in the hidden states' dtype
            self.cast[dtype] = [t.to(dtype) for t in self.table]
        return [t[pos][:, None] for t in self.cast[dtype]]  # (N, 1, head_dim) each

    def __call__(self, emb: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        inner = self.lm.model
        cos, sin = self._rotary(pos, emb.dtype)
        h = emb  # (N, 1, D)
        for i, layer in enumerate(inner.layers):
            h = h + self._attend(layer.self_attn, layer.input_layernorm(h), cos, sin, mask, cache, i)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm.lm_head(inner.norm(h))[:, -1]  # (N, V)

    def _attend(self, attn, x, cos, sin, mask, cache, i: int) -> torch.Tensor:
        shape = (x.shape[0], 1, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)  # (N, H, 1, hd)
        k = attn.k_proj(x).view(shape).transpose(1, 2)  # (N, Hkv, 1, hd)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        k, v = cache.update(k, v, i)  # (N, Hkv, T, hd)
        out, _ = attention.attention(attn, q, k, v, mask, scaling=attn.scaling)  # (N, 1, H, hd)
        return attn.o_proj(out.reshape(x.shape[0], 1, -1).contiguous())
