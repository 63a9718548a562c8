"""The LLM's attention: transformers' SDPA, except a one-token search step on the CPU (issue 21).

A search step asks one query per row against the row's cache. PyTorch's CPU flash kernel pays a
fixed cost per (row, head) block, which at a beam's 120 rows of short caches is most of its time:
0.6-0.9 ms per call against 0.25-0.3 ms for two matmuls and a softmax (120 rows, 4 query heads over
2, 40 keys, 2 threads, on this 2-core AVX2 machine; at one row the two take the same time). So the
step attends with plain matmuls. Every other call (training, a prompt, a GPU) is transformers'
`sdpa_attention_forward` unchanged. The choice depends on neither the batch nor the beam, so a
batched decode still equals one utterance at a time.

In a beam search the beams of an utterance share its prompt, and a step read each prompt key once
per beam, from memory (the cache outgrows the CPU's caches). `one_query_shared` reads the prompt's
keys and values once per utterance (model/kv_cache.py holds them so): its queries for all beams
in one product per kv head, 1.04x a beam-15 decode of 8 utterances. Its numbers depend on the beam
width (an utterance's product has beam x heads rows), still not on the batch.
Registered through transformers' AttentionInterface, the extension point it documents.
"""

from __future__ import annotations

import torch

NAME = "mavsr_sdpa"
ONE_QUERY_DEVICES = ("cpu",)  # where a one-query call attends with one_query; SDPA everywhere else


def one_query(q, key, value, scaling: float, hidden=None, additive=None) -> torch.Tensor:
    """q (B, H, hd), key/value (B, Hkv, T, hd); `hidden` (B, 1, 1, T) True where a row may not look,
    or an `additive` mask of that shape, or neither -> (B, H * hd)."""
    b, h, d = q.shape
    kv = key.shape[1]
    q = q.reshape(b, kv, h // kv, d)  # query head i reads kv head i // (H / Hkv), as repeat_kv pairs them
    w = torch.matmul(q, key.transpose(-1, -2)).mul_(scaling)  # (B, Hkv, G, T)
    return torch.matmul(_weights(w, hidden, additive, value.dtype), value).reshape(b, h * d)


def _weights(w: torch.Tensor, hidden, additive, dtype: torch.dtype) -> torch.Tensor:
    """Scaled scores (B, Hkv, G, T) -> attention weights: masked, softmax in float32, in `dtype`."""
    if hidden is not None:
        w.masked_fill_(hidden, float("-inf"))
    elif additive is not None:
        w = w + additive
    return w.float().softmax(-1).to(dtype)


def one_query_shared(q, pk, pv, gk, gv, beams: int, scaling: float, hidden=None) -> torch.Tensor:
    """one_query for rows whose prompt is held once per utterance (model/kv_cache.py, share_prompt):
    q (N, H, hd) with N = U * beams (an utterance's beams adjacent), pk/pv (U, Hkv, Tp, hd) the
    prompts' keys and values, gk/gv (N, Hkv, Tg, hd) each row's generated ones, `hidden`
    (N, 1, 1, Tp + Tg) True where a row may not look -> (N, H * hd). The prompt's scores and its
    share of the output are one product per utterance and kv head over all its beams' queries;
    the softmax runs over both parts at once, as one_query's."""
    n, h, d = q.shape
    u, kv, tp = pk.shape[0], pk.shape[1], pk.shape[2]
    g = h // kv
    qu = q.reshape(u, beams, kv, g, d).transpose(1, 2).reshape(u, kv, beams * g, d)  # an utterance's queries
    sp = torch.matmul(qu, pk.transpose(-1, -2)).view(u, kv, beams, g, tp).transpose(1, 2).reshape(n, kv, g, tp)
    sg = torch.matmul(q.reshape(n, kv, g, d), gk.transpose(-1, -2))  # (N, Hkv, G, Tg)
    p = _weights(torch.cat([sp, sg], -1).mul_(scaling), hidden, None, pv.dtype)  # (N, Hkv, G, Tp + Tg)
    pp = p[..., :tp].reshape(u, beams, kv, g, tp).transpose(1, 2).reshape(u, kv, beams * g, tp)
    out = torch.matmul(pp, pv).view(u, kv, beams, g, d).transpose(1, 2).reshape(n, kv, g, d)
    return out.add_(torch.matmul(p[..., tp:], gv)).reshape(n, h * d)


def _one_query(query, key, value, mask, scaling: float) -> torch.Tensor:
    """query (B, H, 1, hd), key/value (B, Hkv, T, hd), mask (B, 1, 1, T) bool or additive, or None
    -> (B, 1, H, hd), the layout transformers' attention functions return."""
    b, h, _, d = query.shape
    masks = {} if mask is None else {"hidden": ~mask} if mask.dtype == torch.bool else {"additive": mask}
    return one_query(query.reshape(b, h, d), key, value, scaling, **masks).view(b, 1, h, d)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (query.shape[2] == 1 and query.device.type in ONE_QUERY_DEVICES and not dropout
             and kwargs.get("softcap") is None)
    if not plain or (attention_mask is not None and attention_mask.shape[-2] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _one_query(query, key, value, attention_mask, scale), None


def install(model) -> None:
    """Make `model` (a transformers causal LM) attend through `attention`; its masks are SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
