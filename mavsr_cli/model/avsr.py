"""The AVSR model: frozen LLM with LoRA, fed compressed and projected audio/video tokens.

LLM input (paper.md, Pipeline 5):
    [BOS] <audio> A.. </audio> <video> V.. </video> prompt transcript [EOS]
The four modality markers are learned embeddings owned by this module (not new rows in the LLM's
vocabulary), so the frozen LLM is untouched and the checkpoint holds them with the projectors.
Loss: next-token cross-entropy on the transcript and EOS only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..rates import Rates
from . import projector as proj
from .compress import compress

MARKERS = ("<audio>", "</audio>", "<video>", "</video>")


class AVSRModel(nn.Module):
    def __init__(self, llm, tokenizer, projectors: nn.ModuleDict, prompt: str, compression: str,
                 grid: list[Rates], strategy: str = "ms") -> None:
        super().__init__()
        self.llm = llm  # peft-wrapped causal LM with the adapters of `strategy`
        self.strategy = strategy
        self._active: list[str] | None = None
        self.tokenizer = tokenizer
        self.projectors = projectors
        width = llm.get_input_embeddings().weight.shape[1]
        self.markers = nn.Parameter(torch.randn(len(MARKERS), width) * 0.02)  # (4, D)
        self.compression = compression
        self.grid = list(grid)
        self.prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        # what is trained, fixed once: every LoRA tensor, the projectors and the markers
        for n, p in self.named_parameters():
            p.requires_grad_("lora_" in n or n.startswith("projectors.") or n == "markers")
        self._trainable = [p for p in self.parameters() if p.requires_grad]

    def use_rates(self, rates: Rates) -> None:
        """Activate the adapters of this configuration (SS/MSS: the decode-time rates pick them)."""
        from .llm import adapters_for

        names = adapters_for(self.strategy, rates.tag)
        if names != self._active:
            self.llm.base_model.set_adapter(names if len(names) > 1 else names[0])
            for p in self._trainable:  # peft's set_adapter toggles requires_grad; mavsr decides
                p.requires_grad_(True)
            self._active = names

    # ---- trained state -------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        own = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        from ..errors import MavsrError

        if missing or unexpected:
            raise MavsrError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        shapes = [f"{n} {tuple(state[n].shape)} vs {tuple(p.shape)}" for n, p in own.items() if state[n].shape != p.shape]
        if shapes:
            raise MavsrError(f"checkpoint does not match the model: {len(shapes)} tensor(s) of another shape, "
                             f"e.g. {shapes[0]} (another model or config?)")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n].to(p.dtype))

    # ---- inputs --------------------------------------------------------------------------
    def _media_tokens(self, feats: dict, rates: Rates, pool: Rates | None = None) -> list[list[torch.Tensor]]:
        """Per utterance, the marker-wrapped compressed token blocks: list of (n_i, D) pieces.

        `pool` (inference only): compress at these rates but use the projectors of `rates`, the
        paper's baseline of pooling a model trained at one rate to another at decode time."""
        pieces: list[list[torch.Tensor]] = None
        pool = pool or rates
        for modality, rate, prate, (m_open, m_close) in (("audio", rates.audio, pool.audio, (0, 1)),
                                                         ("video", rates.video, pool.video, (2, 3))):
            if rate is None:
                continue
            x, lengths = feats[modality]  # (B, T, Din), (B,)
            y, ylen = compress(x, lengths, prate, self.compression)  # (B, T', Din*)
            y = self.projectors[proj.key(modality[0], rate)](y)  # (B, T', D)
            if pieces is None:
                pieces = [[] for _ in range(y.shape[0])]
            for i in range(y.shape[0]):
                pieces[i] += [self.markers[m_open:m_open + 1], y[i, : ylen[i]], self.markers[m_close:m_close + 1]]
        return pieces

    def _embed(self, ids: list[int], device) -> torch.Tensor:
        emb = self.llm.get_input_embeddings()
        return emb(torch.tensor(ids, dtype=torch.long, device=device))

    def build(self, feats: dict, rates: Rates, targets: list[list[int]] | None = None, left_pad: bool = False,
              pool: Rates | None = None):
        """-> inputs_embeds (B, L, D), attention_mask (B, L), labels (B, L) or None.

        Also activates the configuration's adapters for the LLM pass that follows."""
        self.use_rates(rates)
        pieces = self._media_tokens(feats, rates, pool)
        device = self.markers.device
        tok = self.tokenizer
        bos = self._embed([tok.bos_token_id], device)
        prompt = self._embed(self.prompt_ids, device)
        seqs, labels = [], []
        for i, p in enumerate(pieces):
            prefix = torch.cat([bos] + p + [prompt])  # (P, D)
            if targets is not None:
                tgt = targets[i] + [tok.eos_token_id]
                seqs.append(torch.cat([prefix, self._embed(tgt, device)]))
                labels.append([-100] * prefix.shape[0] + tgt)
            else:
                seqs.append(prefix)
        longest = max(s.shape[0] for s in seqs)
        width = seqs[0].shape[1]
        b = len(seqs)
        emb = torch.zeros(b, longest, width, dtype=seqs[0].dtype, device=device)
        mask = torch.zeros(b, longest, dtype=torch.long, device=device)
        lab = torch.full((b, longest), -100, dtype=torch.long, device=device) if targets is not None else None
        for i, s in enumerate(seqs):
            n = s.shape[0]
            sl = slice(longest - n, longest) if left_pad else slice(0, n)
            emb[i, sl] = s
            mask[i, sl] = 1
            if lab is not None:
                lab[i, sl] = torch.tensor(labels[i], device=device)
        return emb, mask, lab

    def loss(self, feats: dict, rates: Rates, targets: list[list[int]]) -> torch.Tensor:
        """Mean next-token cross-entropy over the transcript + EOS tokens, one configuration."""
        emb, mask, lab = self.build(feats, rates, targets)
        return self.llm(inputs_embeds=emb, attention_mask=mask, labels=lab).loss

    def ce_sums(self, feats: dict, grid: list[Rates], targets: list[list[int]], packed: bool = False) -> list[torch.Tensor]:
        """Summed next-token cross-entropy over the transcript + EOS tokens, one value per configuration.

        Sums, not means, so a trainer can normalise by the token count of a whole global batch
        (gradient accumulation, several processes) and get exactly the single-batch gradient.
        `packed` runs every configuration in one LLM pass (MS only, see `losses_packed`).
        """
        if packed:
            if self.strategy != "ms":
                raise ValueError("packing configurations into one pass needs the shared-LoRA (ms) strategy")
            built = [self.build(feats, r, targets) for r in grid]
            length = max(e.shape[1] for e, _, _ in built)

            def pad(x, value):
                widths = (0, 0, 0, length - x.shape[1]) if x.dim() == 3 else (0, length - x.shape[1])
                return torch.nn.functional.pad(x, widths, value=value)

            emb = torch.cat([pad(e, 0.0) for e, _, _ in built])  # (G*B, L, D)
            mask = torch.cat([pad(m, 0) for _, m, _ in built])  # (G*B, L)
            lab = torch.cat([pad(y, -100) for _, _, y in built])  # (G*B, L)
            ce = self._token_ce(emb, mask, lab)  # (G*B, L-1)
            b = len(targets)
            return [ce[k * b:(k + 1) * b].sum() for k in range(len(grid))]
        out = []
        for r in grid:
            emb, mask, lab = self.build(feats, r, targets)
            out.append(self._token_ce(emb, mask, lab).sum())
        return out

    def _token_ce(self, emb, mask, lab) -> torch.Tensor:
        logits = self.llm(inputs_embeds=emb, attention_mask=mask).logits[:, :-1]  # (B, L-1, V)
        gold = lab[:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), gold.reshape(-1),
                                                 ignore_index=-100, reduction="none").view(gold.shape)

    def losses_packed(self, feats: dict, grid: list[Rates], targets: list[list[int]]) -> list[torch.Tensor]:
        """The per-configuration losses of `loss`, from one LLM pass over all configurations.

        Valid only when every configuration runs through the same adapters (MS): the sequences of all
        configurations are right-padded to one length and stacked along the batch, so the LLM
        sees (len(grid) * B) sequences at once. Right padding leaves each real token's position
        and attention unchanged, so each loss equals the unpacked one.
        """
        n = sum(len(t) + 1 for t in targets)
        return [s / n for s in self.ce_sums(feats, grid, targets, packed=True)]

    @torch.no_grad()
    def generate(self, feats: dict, rates: Rates, max_new_tokens: int, beam: int = 1,
                 pool: Rates | None = None) -> tuple[list[str], list[int]]:
        """Deterministic decoding, never sampling: greedy (`beam` 1, transformers' generate) or
        mavsr's batched beam search. Returns texts and the LLM input length per utterance."""
        emb, mask, _ = self.build(feats, rates, None, left_pad=True, pool=pool)
        tok = self.tokenizer
        if beam > 1:
            ids = self.beam_search(emb, mask, beam, max_new_tokens)
        else:
            ids = self.llm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, num_beams=1, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts], mask.sum(1).tolist()

    @torch.no_grad()
    def beam_search(self, emb: torch.Tensor, mask: torch.Tensor, beam: int, max_new_tokens: int,
                    length_penalty: float = 1.0) -> list[list[int]]:
        """Batched beam search with a KV cache; the prompt is run once per utterance, not per beam.

        transformers' beam search copies every input `beam` times before the first forward pass,
        so the (long) audio-visual prefix is computed beam-fold; here the prefix is run once and
        its cache expanded. Per step, each utterance keeps the `beam` best live hypotheses from the
        2*beam best candidates; a candidate ending in EOS among the first `beam` is finished with
        score sum(log p) / length**length_penalty. An utterance is done when it holds `beam`
        finished hypotheses (early stopping), and the best finished one is returned.
        """
        eos = self.tokenizer.eos_token_id
        b, k = emb.shape[0], beam
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        logp = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(k, 0)  # (B*K, V)
        vocab = logp.shape[-1]
        cache.batch_repeat_interleave(k)
        mask = mask.repeat_interleave(k, 0)
        last_pos = pos[:, -1].repeat_interleave(k)
        # live state of the active utterances (rows p*k .. p*k+k-1 of the cache belong to active[p])
        active = list(range(b))
        scores = torch.full((b, k), float("-inf"))
        scores[:, 0] = 0.0  # one live beam at the start: the others must not duplicate it
        seqs: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(b)]
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        last_live: dict[int, list[tuple[float, list[int]]]] = {}
        for step in range(max_new_tokens):
            a = len(active)
            top_s, top_i = (scores.view(-1, 1) + logp).view(a, k * vocab).topk(2 * k, dim=-1)  # sorted
            top_s, top_i = top_s.tolist(), top_i.tolist()  # the bookkeeping below is plain Python
            keep, rows, toks, new_scores, new_seqs = [], [], [], [], []
            for p, i in enumerate(active):
                n, live = 0, []
                for rank in range(2 * k):
                    sc = top_s[p][rank]
                    if sc == float("-inf"):
                        break
                    src, t = divmod(top_i[p][rank], vocab)
                    if t == eos:
                        if rank < k:
                            hyp = seqs[p][src]
                            finished[i].append((sc / (len(hyp) + 1) ** length_penalty, hyp))
                        continue
                    live.append((sc, src, t))
                    n += 1
                    if n == k:
                        break
                if len(finished[i]) >= k:
                    continue  # done (early stopping): its rows leave the batch
                live += [(float("-inf"), 0, eos)] * (k - len(live))
                if step == max_new_tokens - 1:
                    last_live[i] = [(sc, seqs[p][src] + [t]) for sc, src, t in live if sc > float("-inf")]
                    continue
                keep.append(i)
                rows += [p * k + src for _, src, _ in live]
                toks += [t for _, _, t in live]
                new_scores.append([sc for sc, _, _ in live])
                new_seqs.append([seqs[p][src] + [t] for _, src, t in live])
            if not keep:
                break
            idx = torch.tensor(rows)
            cache.reorder_cache(idx)  # reorders beams and drops the rows of finished utterances
            mask = torch.cat([mask[idx], mask.new_ones(len(rows), 1)], dim=1)
            last_pos = last_pos[idx] + 1
            active, seqs, scores = keep, new_seqs, torch.tensor(new_scores)
            step_emb = self.llm.get_input_embeddings()(torch.tensor(toks)[:, None])
            out = self.llm(inputs_embeds=step_emb, attention_mask=mask, position_ids=last_pos[:, None],
                           cache=cache, use_cache=True)
            logp = torch.log_softmax(out.logits[:, -1].float(), -1)
        best = []
        for i in range(b):
            cands = list(finished[i])
            if len(cands) < k:  # ran out of steps: the live beams count too
                cands += [(sc / max(1, len(h)) ** length_penalty, h) for sc, h in last_live.get(i, [])]
            best.append(max(cands, key=lambda c: c[0])[1] if cands else [])
        return best
