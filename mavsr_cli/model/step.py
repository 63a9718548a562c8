"""One search step of the LLM: every row's next-token logits from one new token and its cache (issue 21).

A beam step at 120 rows runs 23 matrix products near this CPU's peak, and around them transformers'
per-call machinery: the model's, decoder layers' and attention's wrappers, output recording, the
mask's checks, and the rotary embedding's cos/sin recomputed for the step's positions. For a Llama
decoder `LlamaStep` calls the same modules in the order `LlamaModel.forward` does (norms, peft's LoRA
projections, `apply_rotary_pos_emb`, the cache's `update`, mavsr's attention, the MLP, the output
layer), with the cos/sin rows read from a table made once by the model's own rotary module, so the
logits are the same numbers as the full call's (tested with `torch.equal`). Any other model, or an
attention other than mavsr's, takes the full call.

Each linear layer is resolved once per search into the operations its forward runs: a plain
`nn.Linear` is `F.linear`; peft's LoRA `Linear` with vanilla adapters, no dropout (or dropout in eval
mode) and nothing merged is `base(x) + B(A(x)) * scaling` per active adapter, the sum
`peft.tuners.lora.Linear.forward` computes, without its per-call checks of adapter names, variants
and merges (about 100 us of its 460 at 120 rows; four such layers a step in the authors' q/v setup).
Anything else (hooks, DoRA, dropout while training) is called as the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        self.proj = [{name: _linear(getattr(part, name)) for part, names in
                      ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                       (layer.mlp, ("gate_proj", "up_proj", "down_proj"))) for name in names}
                     for layer in lm.model.layers]
        self.act = [layer.mlp.act_fn for layer in lm.model.layers]

    def _rotary(self, pos: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        if dtype not in self.cast:  # the module returns cos/sin in the hidden states' dtype
            self.cast[dtype] = [t.to(dtype) for t in self.table]
        return [t[pos][:, None] for t in self.cast[dtype]]  # (N, 1, head_dim) each

    def __call__(self, emb: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        inner = self.lm.model
        cos, sin = self._rotary(pos, emb.dtype)
        h = emb  # (N, 1, D)
        for i, layer in enumerate(inner.layers):
            h = h + self._attend(layer.self_attn, self.proj[i], layer.input_layernorm(h), cos, sin, mask, cache, i)
            p, x = self.proj[i], layer.post_attention_layernorm(h)
            h = h + p["down_proj"](self.act[i](p["gate_proj"](x)) * p["up_proj"](x))  # LlamaMLP.forward
        return self.lm.lm_head(inner.norm(h))[:, -1]  # (N, V)

    def _attend(self, attn, p, x, cos, sin, mask, cache, i: int) -> torch.Tensor:
        shape = (x.shape[0], 1, -1, attn.head_dim)
        q = p["q_proj"](x).view(shape).transpose(1, 2)  # (N, H, 1, hd)
        k = p["k_proj"](x).view(shape).transpose(1, 2)  # (N, Hkv, 1, hd)
        v = p["v_proj"](x).view(shape).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        k, v = cache.update(k, v, i)  # (N, Hkv, T, hd)
        out, _ = attention.attention(attn, q, k, v, mask, scaling=attn.scaling)  # (N, 1, H, hd)
        return p["o_proj"](out.reshape(x.shape[0], 1, -1).contiguous())


def _hooked(mod: torch.nn.Module) -> bool:
    return any(getattr(m, h) for m in mod.modules() for h in ("_forward_hooks", "_forward_pre_hooks"))


def _identity(mod: torch.nn.Module) -> bool:
    return isinstance(mod, torch.nn.Identity) or (isinstance(mod, torch.nn.Dropout) and not mod.training)


def _linear(mod: torch.nn.Module):
    """x -> mod(x) as the operations mod's forward runs for it now (see the module's docstring)."""
    from peft.tuners.lora import Linear as LoraLinear

    if _hooked(mod):
        return mod
    if type(mod) is torch.nn.Linear:
        return lambda x: F.linear(x, mod.weight, mod.bias)
    if type(mod) is not LoraLinear or mod.disable_adapters or mod.merged or not isinstance(mod.base_layer,
                                                                                         torch.nn.Linear):
        return mod
    if not (hasattr(mod, "lora_variant") and hasattr(mod, "_cast_input_dtype")):
        return mod  # a peft without adapter variants: not the forward this follows (read in peft 0.21)
    names = [a for a in mod.active_adapters if a in mod.lora_A.keys()]
    if any(a in mod.lora_variant or not _identity(mod.lora_dropout[a]) for a in names):
        return mod
    base = mod.base_layer
    lora = [(mod.lora_A[a].weight, mod.lora_B[a].weight, mod.scaling[a]) for a in names]
    if any(type(m) is not torch.nn.Linear or m.bias is not None for a in names for m in (mod.lora_A[a], mod.lora_B[a])):
        return mod

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, base.weight, base.bias)
        dtype = out.dtype
        for a, b, scaling in lora:
            x = mod._cast_input_dtype(x, a.dtype)
            out = out + F.linear(F.linear(x, a), b) * scaling
        return out.to(dtype)
    return forward
