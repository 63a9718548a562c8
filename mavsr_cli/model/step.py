"""One search step of the LLM: every row's next-token logits from one new token and its cache (issue 21).

A beam step at 120 rows runs 23 matrix products near this CPU's peak, and around them transformers'
per-call machinery: the model's, decoder layers' and attention's wrappers, output recording, the
mask's checks, and the rotary embedding's cos/sin recomputed for the step's positions. For a Llama
decoder `LlamaStep` runs the operations `LlamaModel.forward` runs, in its order (RMS norms, peft's
LoRA projections, the rotary embedding, the cache's `update`, the attention the full call would
take: mavsr's matmul attention on the CPU, transformers' SDPA elsewhere, the MLP, the output layer),
with the cos/sin rows read from a table made once by the model's own rotary module, so the logits
are the same numbers as the full call's (tested with `torch.equal` on the CPU). Any other model, or
an attention other than mavsr's, takes the full call. One exception, on the CPU: a beam search
whose cache holds each utterance's prompt once (`shares_prompt`; model/kv_cache.py), which the
full call could not read; there the step attends with `attention.one_query_shared`, equal to the
per-row attention to rounding (tested). Being equal to rounding already, that step also takes two
faster forms of its products, each equal to rounding (`rounding` below):

- each float32 LoRA projection as one product on its weight with the adapters added in,
  W + s * B @ A (peft's merge, made once per search on a copy; the model is untouched): one product
  instead of three and no add, 1.06-1.08x a beam-15 decode of 8 utterances, for a copy of the
  adapted weights while the search runs (q and v of Llama-3.2-1B: 335 MB in float32, about
  5 GFLOP to make, a fraction of one step there). A bf16 LLM keeps its adapters apart: merged into
  bf16 weights they would lose most of their bits;
- each float32 product on an x86-64 CPU as oneDNN's (`torch.ops.mkldnn._linear_pointwise`, the
  product inductor's CPU code calls) on the plain weight, where torch.mm calls MKL, whose packing of
  the transposed weight dominates at a beam's few rows: at Llama-3.2-1B's shapes with 120 rows
  1.21-1.87x faster (the output layer 335 against 628 ms), with 15 rows 1.75-3.05x; at the compared
  tiny shapes, whose weights stay in the CPU's caches, about even alone (0.57-1.41x), and 1.03x
  (beam 15 x 8) and 1.06x (beam 15 x 1) a decode in one process (benchmarks/cpu_products.md,
  benchmarks/vs_authors.md). Its rows do not depend on the rows beside them from 2 rows up (a
  beam's rows are at least 2; tested), so a batch still decodes as its utterances alone.

Apart from those two forms, the step holds its rows as (N, D) matrices and each operation at its
cheapest equal form: a product is `torch.mm` on the weight's transposed view (what `F.linear`
calls for a matrix without bias), an elementwise result only the step holds is overwritten in
place (`mul_`, `add_`; not in a layer where a module is called as itself, which may keep what it
saw), and `rotate_half(x) * sin` is `cat(x2, x1) * [-sin1, sin2]` (negation is exact). Same
operands, same rounding, two thirds of the operator calls of the module-by-module step (1.06-1.08x
a beam-15 decode).

Each linear layer is resolved once per search (the beam step on the CPU as above): a plain
`nn.Linear` is its product; peft's LoRA `Linear` with vanilla adapters, no dropout (or dropout in
eval mode) and nothing merged is `base(x) + B(A(x)) * scaling` per active adapter, the sum
`peft.tuners.lora.Linear.forward` computes, without its per-call checks of adapter names, variants
and merges. A norm is resolved to
`LlamaRMSNorm.forward`'s operations when it is that module unchanged. Anything else (hooks, DoRA,
dropout while training, another norm) is called as the module, on the (N, 1, D) input the full call
gives it. A model with a hook anywhere (on a layer or the model too, or torch's global module hooks)
or a patched forward takes the full call, which runs them where they belong.
"""

from __future__ import annotations

import platform

import torch

from . import attention

_STATIC_ROPE = ("default", "llama3", "linear")  # cos/sin depend on the position only: a table holds them
_PROJ = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


def one_token_step(lm, positions: int, beams: int = 1):
    """A function (emb (N, 1, D), pos (N,), mask (N, 1, 1, T) bool, cache) -> logits (N, V) for the
    causal LM `lm`; `positions` bounds the positions it will be asked (prompt + generated tokens),
    `beams` the rows per utterance (a beam search's: its step may hold the prompt once)."""
    if LlamaStep.fits(lm):
        return LlamaStep(lm, positions, beams)

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
                and getattr(rotary, "rope_type", None) in _STATIC_ROPE and not lm.training
                and not _hooked(lm))  # a hook anywhere, a layer's or the model's too: the full call runs it

    def __init__(self, lm, positions: int, beams: int = 1) -> None:
        self.lm = lm
        dev = lm.lm_head.weight.device
        # where it attends with matmuls, a beam's prompt can be held once per utterance (kv_cache.share_prompt);
        # that step is equal to rounding, and takes the faster forms of its products (the module's docstring)
        self.shares_prompt = beams > 1 and dev.type in attention.ONE_QUERY_DEVICES
        at = torch.arange(positions, device=dev)[None]
        cos, sin = (t[0] for t in lm.model.rotary_emb(torch.zeros(1, device=dev), at))
        half = sin.shape[-1] // 2
        # (positions, head_dim) in float32, as the module computes them; sin signed for the swapped halves
        self.table = [cos, torch.cat([-sin[:, :half], sin[:, half:]], -1)]
        self.half = half
        self.cast: dict[torch.dtype, list[torch.Tensor]] = {}
        self.proj = [{name: _linear(getattr(getattr(layer, part), name), rounding=self.shares_prompt)
                      for part, names in _PROJ for name in names}
                     for layer in lm.model.layers]
        self.norms = [(_rms_norm(layer.input_layernorm), _rms_norm(layer.post_attention_layernorm))
                      for layer in lm.model.layers]
        self.act = [_activation(layer.mlp.act_fn) for layer in lm.model.layers]
        self.final_norm, self.head = _rms_norm(lm.model.norm), _linear(lm.lm_head, self.shares_prompt)
        # per layer: add and multiply in place, unless a module called as itself may keep what it saw
        self.ops = [(torch.add, torch.mul) if any(isinstance(f, _AsModule) for f in
                                                  (*self.proj[i].values(), *self.norms[i], self.act[i]))
                    else (add_fresh, mul_fresh) for i in range(len(self.proj))]

    def _rotary(self, pos: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        if dtype not in self.cast:  # the module returns cos/sin in the hidden states' dtype
            self.cast[dtype] = [t.to(dtype) for t in self.table]
        return [t[pos][:, None] for t in self.cast[dtype]]  # (N, 1, head_dim) each

    def __call__(self, emb: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        cos, sin = self._rotary(pos, emb.dtype)
        masks = (mask, ~mask)  # (N, 1, 1, T): where a row may look, and where not, for every layer
        h = emb.reshape(emb.shape[0], -1)  # (N, D)
        for i, layer in enumerate(self.lm.model.layers):
            p, (norm1, norm2), (add, mul) = self.proj[i], self.norms[i], self.ops[i]
            h = h + self._attend(layer.self_attn, p, norm1(h), cos, sin, masks, cache, i)  # new: emb is the caller's
            x = norm2(h)
            h = add(h, p["down_proj"](mul(self.act[i](p["gate_proj"](x)), p["up_proj"](x))))  # LlamaMLP.forward
        return self.head(self.final_norm(h))  # (N, V)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """apply_rotary_pos_emb for one of q, k (N, heads, hd): x*cos + rotate_half(x)*sin."""
        return add_fresh(x * cos, mul_fresh(torch.cat([x[..., self.half:], x[..., : self.half]], -1), sin))

    def _attend(self, attn, p, x, cos, sin, masks, cache, i: int) -> torch.Tensor:
        n, hd = x.shape[0], attn.head_dim
        q = self._rope(p["q_proj"](x).view(n, -1, hd), cos, sin)  # (N, H, hd)
        k = self._rope(p["k_proj"](x).view(n, -1, hd), cos, sin)  # (N, Hkv, hd)
        layer = cache.layers[i]
        if getattr(layer, "shared", 1) > 1:  # the prompt held once per utterance (model/kv_cache.py)
            layer.write(k[:, :, None], p["v_proj"](x).view(n, -1, 1, hd))
            return p["o_proj"](attention.one_query_shared(q, *layer.parts(), layer.shared, attn.scaling,
                                                          hidden=masks[1]))
        keys, values = cache.update(k[:, :, None], p["v_proj"](x).view(n, -1, 1, hd), i)  # (N, Hkv, T, hd)
        if x.device.type in attention.ONE_QUERY_DEVICES:  # what attention.attention does for one query there
            out = attention.one_query(q, keys, values, attn.scaling, hidden=masks[1])
        else:
            out = attention.attention(attn, q[:, :, None], keys, values, masks[0], scaling=attn.scaling)[0]
        return p["o_proj"](out.reshape(n, -1))


def add_fresh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, written into a (a fresh result nothing else reads) where that keeps a + b's dtype."""
    return a.add_(b) if a.dtype == b.dtype else a + b


def mul_fresh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b, written into a where that keeps a * b's dtype (see add_fresh)."""
    return a.mul_(b) if a.dtype == b.dtype else a * b


class _AsModule:
    """x (N, in) -> mod(x) for a module the step cannot resolve, called on the (N, 1, in) the full call gives it."""

    def __init__(self, mod: torch.nn.Module) -> None:
        self.mod = mod

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.mod(x[:, None])[:, 0]


def _hooked(mod: torch.nn.Module) -> bool:
    """Hooks on mod or its children, or on every module (torch's global hooks), or a patched forward."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in mod.modules())


def _activation(act: torch.nn.Module):
    """The MLP's activation: called directly (elementwise, any shape) unless something may watch it."""
    return _AsModule(act) if _hooked(act) else act


def _identity(mod: torch.nn.Module) -> bool:
    return isinstance(mod, torch.nn.Identity) or (isinstance(mod, torch.nn.Dropout) and not mod.training)


def _rms_norm(mod: torch.nn.Module):
    """x (N, D) -> mod(x), as LlamaRMSNorm.forward's operations where mod is that module unchanged."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if type(mod) is not LlamaRMSNorm or type(mod).forward.__module__ != LlamaRMSNorm.__module__ or _hooked(mod):
        return _AsModule(mod)
    w, eps = mod.weight, mod.variance_epsilon

    def forward(x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        y = (x32 * x32.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()).to(x.dtype)
        return mul_fresh(y, w)  # weight * y
    return forward


def _product(weight: torch.Tensor, bias: torch.Tensor | None, rounding: bool = False):
    """x (N, in) -> F.linear(x, weight, bias), as the one BLAS call F.linear makes for a matrix, or
    where `rounding` allows it, oneDNN's product (the module's docstring; rows N >= 2)."""
    if rounding and _onednn(weight):
        op = torch.ops.mkldnn._linear_pointwise

        def product(x: torch.Tensor) -> torch.Tensor:
            return op(x, weight, bias, "none", [], "")
        product.onednn = True  # for the tests: which products the step takes from oneDNN
        return product
    wt = weight.t()
    if bias is None:
        return lambda x: torch.mm(x, wt)
    return lambda x: torch.addmm(bias, x, wt)


def _linear(mod: torch.nn.Module, rounding: bool = False):
    """x (N, in) -> mod(x) as the operations mod's forward runs for it now (see the module's docstring);
    `rounding`: equal to rounding is enough (a beam's step on the CPU): a float32 LoRA layer outside
    autocast as one product on its merged weight, and float32 products from oneDNN."""
    from peft.tuners.lora import Linear as LoraLinear

    if _hooked(mod):
        return _AsModule(mod)
    if type(mod) is torch.nn.Linear:
        return _product(mod.weight, mod.bias, rounding)
    if type(mod) is not LoraLinear or mod.disable_adapters or mod.merged or type(mod.base_layer) is not torch.nn.Linear:
        return _AsModule(mod)
    if not (hasattr(mod, "lora_variant") and hasattr(mod, "_cast_input_dtype")):
        return _AsModule(mod)  # a peft without adapter variants: not the forward this follows (read in peft 0.21)
    names = [a for a in mod.active_adapters if a in mod.lora_A.keys()]
    if any(a in mod.lora_variant or not _identity(mod.lora_dropout[a]) for a in names):
        return _AsModule(mod)
    if any(type(m) is not torch.nn.Linear or m.bias is not None for a in names for m in (mod.lora_A[a], mod.lora_B[a])):
        return _AsModule(mod)
    if rounding and names and _float32(mod, names):
        merged = _product(_merged(mod, names), mod.base_layer.bias, rounding)
        merged.merged = True  # for the tests: which projections the step reads merged
        return merged
    base = _product(mod.base_layer.weight, mod.base_layer.bias)
    lora = [(mod.lora_A[a].weight.dtype, mod.lora_A[a].weight.t(), mod.lora_B[a].weight.t(), mod.scaling[a])
            for a in names]

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = base(x)
        dtype = out.dtype
        for a_dtype, at, bt, scaling in lora:
            x = mod._cast_input_dtype(x, a_dtype)
            delta = torch.mm(torch.mm(x, at), bt).mul_(scaling)
            out = add_fresh(out, delta)
        return out.to(dtype)
    return forward


def _float32(mod, names: list[str]) -> bool:
    """Base and adapters in float32, no autocast: merging would round a bf16 adapter into bf16 weights."""
    weights = [mod.base_layer.weight] + [m.weight for a in names for m in (mod.lora_A[a], mod.lora_B[a])]
    dev = mod.base_layer.weight.device.type
    return all(w.dtype == torch.float32 for w in weights) and not torch.is_autocast_enabled(dev)


def _onednn(weight: torch.Tensor) -> bool:
    """oneDNN's product for this float32 weight on an x86-64 CPU, outside autocast (measured there only)."""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and platform.machine() in ("x86_64", "AMD64")
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and not torch.is_autocast_enabled("cpu"))


@torch.no_grad()
def _merged(mod, names: list[str]) -> torch.Tensor:
    """W + sum over the active adapters of scaling * B @ A (out, in): peft's merge, on a copy."""
    w = mod.base_layer.weight.detach().clone()
    for a in names:
        w.addmm_(mod.lora_B[a].weight, mod.lora_A[a].weight, alpha=mod.scaling[a])
    return w
