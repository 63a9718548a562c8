"""The AVSR model: frozen LLM with LoRA, fed compressed and projected audio/video tokens.

LLM input (paper.md, Pipeline 5):
    [BOS] <audio> A.. </audio> <video> V.. </video> prompt transcript [EOS]
The four modality markers are learned embeddings owned by this module (not new rows in the LLM's
vocabulary), so the frozen LLM is untouched and the checkpoint holds them with the projectors.
Loss: next-token cross-entropy on the transcript and EOS only. Searching over the LLM's outputs
(greedy, beam) is decoding.py's.
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
        shapes = [f"{n} {tuple(state[n].shape)} vs {tuple(p.shape)}"
                  for n, p in own.items() if state[n].shape != p.shape]
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

    def ce_sums(self, feats: dict, grid: list[Rates], targets: list[list[int]],
                packed: bool = False) -> list[torch.Tensor]:
        """Summed next-token cross-entropy over the transcript + EOS tokens, one value per configuration.

        Sums, not means, so a trainer can normalise by the token count of a whole global batch
        (gradient accumulation, several processes) and get exactly the single-batch gradient.
        `packed` runs every configuration in one LLM pass (MS only): the sequences of all
        configurations are right-padded to one length and stacked along the batch, (G*B) rows at
        once; right padding leaves each real token's position and attention unchanged, so each sum
        equals the unpacked one.
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
