"""The KV cache of mavsr's searches: written in place, and a beam's prompt held once (issue 21).

Its storage is allocated once for the prompt and `extra` generated tokens, and each step writes its
keys and values into it: no concatenation, so no fresh memory every step. After the prompt a beam
search gives each utterance `k` rows in one of two layouts:

- `batch_repeat_interleave(k)`: the prompt's keys and values copied into each of the utterance's
  rows, (N, Hkv, T, hd) per layer, the layout any attention reads (transformers' beam search makes it);
- `share_prompt(k)`: the prompt held once per utterance, (B, Hkv, Tp, hd), beside each row's
  generated part, (B*k, Hkv, extra, hd). What `model/step.py` uses where it attends with
  `attention.one_query_shared`: a beam-15 step reads each prompt key once instead of 15 times, and
  the prompt's part of the cache takes 1/k of the memory.

A reorder (each beam taking its parent's history) copies only the generated part: the rows of an
utterance share its prompt. Whole rows move only when finished utterances leave the batch.
"""

from __future__ import annotations

import torch


def in_place_cache(extra: int):
    """A transformers `Cache` whose layers hold their rows in place, with room for `extra` generated
    tokens after the prompt."""
    from transformers.cache_utils import Cache, DynamicLayer

    return Cache(layer_class_to_replicate=type("InPlaceLayer", (_InPlace, DynamicLayer), {"extra": extra}))


class _InPlace:
    """The methods of a cache layer (transformers' DynamicLayer, whose own they replace)."""

    extra = 0  # generated tokens there is room for
    shared = 1  # rows per prompt row: 1, or k after share_prompt(k)

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' call: write, and return every row's keys and values (N, Hkv, T, hd); in
        the shared layout these are assembled afresh, which the step's shared attention avoids."""
        self.write(key_states, value_states)
        if self.shared == 1:
            return self._views()
        pk, pv, gk, gv = self.parts()
        self.keys, self.values = (torch.cat([p.repeat_interleave(self.shared, 0), g], 2)
                                  for p, g in ((pk, gk), (pv, gv)))
        return self.keys, self.values

    def write(self, key_states, value_states) -> None:
        """Append the rows' new keys and values (N, Hkv, t, hd) in place."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h, n, d = key_states.shape
            self.buf = [key_states.new_empty(b, h, n + self.extra, d), value_states.new_empty(b, h, n + self.extra, d)]
            self.n = self.prompt = 0
        t = key_states.shape[-2]
        at, bufs = (self.n - self.prompt, self.gen) if self.shared > 1 else (self.n, self.buf)
        bufs[0][:, :, at:at + t] = key_states
        bufs[1][:, :, at:at + t] = value_states
        self.n += t

    def parts(self) -> tuple[torch.Tensor, ...]:
        """Shared layout: the prompt's keys and values (B, Hkv, Tp, hd) and the rows' generated
        ones (B*k, Hkv, Tg, hd)."""
        g = self.n - self.prompt
        return self.buf[0], self.buf[1], self.gen[0][:, :, :g], self.gen[1][:, :, :g]

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0

    def _views(self):
        """keys/values: every row's, (N, Hkv, T, hd); in the shared layout the prompts' own storage
        (so that no view holds a storage the layer has let go)."""
        if self.shared > 1:
            self.keys, self.values = self.buf
        else:
            self.keys, self.values = (x[:, :, : self.n] for x in self.buf)
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.buf = [x.repeat_interleave(repeats, dim=0) for x in self.buf]
        self.prompt = self.n  # every beam of an utterance holds the same prompt from here on
        self._views()

    def share_prompt(self, k: int) -> None:
        """From here on, k rows per utterance (its beams, adjacent) that share its prompt."""
        self.buf = [x[:, :, : self.n].clone() for x in self.buf]  # the prompt only, once per utterance
        b, h, _, d = self.buf[0].shape
        self.gen = [x.new_empty(b * k, h, self.extra, d) for x in self.buf]
        self.prompt, self.shared = self.n, k
        self._views()  # the prompt call's views held the old storage alive

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        rows = self.gen if self.shared > 1 else self.buf
        if len(beam_idx) != rows[0].shape[0]:  # rows leave: one gather of what remains
            rows[:] = [x.index_select(0, beam_idx) for x in rows]
            if self.shared > 1:  # and the prompts of the utterances they belong to
                self.buf = [x.index_select(0, beam_idx[:: self.shared] // self.shared) for x in self.buf]
        else:  # beams move only within their utterance, whose rows share the prompt: gather the rest
            lo, hi = (0, self.n - self.prompt) if self.shared > 1 else (self.prompt, self.n)
            for x in rows:
                x[:, :, lo:hi] = x[:, :, lo:hi].index_select(0, beam_idx)
        self._views()


def share_prompt(cache, k: int) -> None:
    """Every layer of an in_place_cache to the shared layout: k rows per utterance from here on."""
    for layer in cache.layers:
        layer.share_prompt(k)
