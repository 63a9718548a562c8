"""The AVSR model: frozen LLM with LoRA, fed compressed and projected audio/video tokens.

LLM input (docs/method.md, Pipeline 5):
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
from . import merged
from . import projector as proj
from .compress import compress
from .last_layer import last_layer_at, query_windows
from .llm import causal_lm

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
        # what is trained, fixed once: every LoRA tensor, the projectors and the markers, in float32
        # whatever the frozen LLM is held in (the optimizer updates these tensors themselves)
        for n, p in self.named_parameters():
            p.requires_grad_("lora_" in n or n.startswith("projectors.") or n == "markers")
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        self._trainable = [p for p in self.parameters() if p.requires_grad]

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype the frozen LLM's weights are held in (model.frozen_dtype)."""
        return self.llm.get_input_embeddings().weight.dtype

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
    def _media_blocks(self, feats: dict, rates: Rates, pool: Rates | None = None) -> list[tuple]:
        """Per stream present: (projected tokens (B, T', D), lengths (B,), its two marker rows).

        `pool` (inference only): compress at these rates but use the projectors of `rates`, the
        paper's baseline of pooling a model trained at one rate to another at decode time."""
        pool = pool or rates
        blocks = []
        for modality, rate, prate, marks in (("audio", rates.audio, pool.audio, (0, 1)),
                                             ("video", rates.video, pool.video, (2, 3))):
            if rate is None:
                continue
            x, lengths = feats[modality]  # (B, T, Din), (B,)
            y, ylen = compress(x, lengths, prate, self.compression)  # (B, T', Din*)
            blocks.append((self.projectors[proj.key(modality[0], rate)](y), ylen.tolist(), marks))  # (B, T', D)
        return blocks

    def _embed(self, ids: list[int], device) -> torch.Tensor:
        emb = self.llm.get_input_embeddings()
        return emb(torch.tensor(ids, dtype=torch.long, device=device))

    def build(self, feats: dict, rates: Rates, targets: list[list[int]] | None = None, left_pad: bool = False,
              pool: Rates | None = None):
        """-> inputs_embeds (B, L, D), attention_mask (B, L), labels (B, L) or None.

        Also activates the configuration's adapters for the LLM pass that follows. Every row of the
        batch is gathered at once from one table of the rows it is made of: the markers, BOS and
        prompt, each stream's tokens, the transcripts (+ EOS) and a zero row for padding."""
        self.use_rates(rates)
        blocks = self._media_blocks(feats, rates, pool)
        device, tok = self.markers.device, self.tokenizer
        b = blocks[0][0].shape[0]
        tgts = [t + [tok.eos_token_id] for t in targets] if targets is not None else [[] for _ in range(b)]
        parts = [self.markers, self._embed([tok.bos_token_id] + self.prompt_ids, device)]
        parts += [y.reshape(-1, y.shape[-1]) for y, _, _ in blocks]
        parts.append(self._embed(sum(tgts, []), device) if targets is not None else parts[1][:0])
        width = parts[1].shape[1]
        # (rows, D); the last row pads. In the frozen LLM's dtype, as its own embedding gives its inputs: the
        # float32 markers and projections would otherwise promote a bf16 LLM's residual stream to float32, and
        # with it the keys its rotary embedding writes to the KV cache (twice the bytes, and cast back to bf16
        # at every step by a GPU's autocast attention)
        table = torch.cat(parts + [parts[1].new_zeros(1, width)]).to(self.frozen_dtype)
        rows, labels = self._rows(blocks, tgts, table.shape[0] - 1)
        longest = max(len(r) for r in rows)
        cpu = torch.device("cpu")  # filled row by row here, then moved to the model's device at once
        idx = torch.full((b, longest), table.shape[0] - 1, dtype=torch.long, device=cpu)
        mask = torch.zeros(b, longest, dtype=torch.long, device=cpu)
        lab = torch.full((b, longest), -100, dtype=torch.long, device=cpu)
        for i, r in enumerate(rows):
            sl = slice(longest - len(r), longest) if left_pad else slice(0, len(r))
            idx[i, sl] = torch.tensor(r, device=cpu)
            mask[i, sl] = 1
            lab[i, sl] = torch.tensor(labels[i], device=cpu)
        # embedding, not table[idx]: the index gather's backward adds the rows used many times (markers)
        # with atomics on a multi-threaded CPU, in an order that changed gradients from run to run
        emb = torch.nn.functional.embedding(idx.to(device), table)  # (B, L, D)
        return emb, mask.to(device), (lab.to(device) if targets is not None else None)

    def _rows(self, blocks: list[tuple], tgts: list[list[int]], end: int) -> tuple[list[list[int]], list[list[int]]]:
        """Per utterance, the table rows of [BOS] <audio> A </audio> <video> V </video> prompt transcript
        EOS (`end`: the table's length without its padding row), and its labels (-100 before the
        transcript)."""
        n_prompt = len(self.prompt_ids)
        base = len(MARKERS) + 1 + n_prompt  # the media tokens start after markers, BOS and prompt
        offsets, start = [], base
        for y, _, _ in blocks:
            offsets.append(start)
            start += y.shape[0] * y.shape[1]
        rows, labels, t0 = [], [], start
        for i, tgt in enumerate(tgts):
            r = [len(MARKERS)]  # BOS
            for (y, ylen, (m_open, m_close)), off in zip(blocks, offsets, strict=True):
                first = off + i * y.shape[1]
                r += [m_open] + list(range(first, first + ylen[i])) + [m_close]
            r += list(range(len(MARKERS) + 1, base))  # the prompt
            labels.append([-100] * len(r) + tgt)
            rows.append(r + list(range(t0, t0 + len(tgt))))
            t0 += len(tgt)
        assert t0 == end
        return rows, labels

    def ce_sums(self, feats: dict, grid: list[Rates], targets: list[list[int]],
                packed: bool = False) -> list[torch.Tensor]:
        """Summed next-token cross-entropy over the transcript + EOS tokens, one value per configuration.

        Sums, not means, so a trainer can normalise by the token count of a whole global batch
        (gradient accumulation, several processes) and get exactly the single-batch gradient.
        With one shared LoRA (MS) several configurations run in one LLM pass, their rows merged
        (merged.py; the same sums to float rounding at LoRA dropout 0), wherever the LLM's layers are
        plain (not under FSDP or gradient checkpointing);
        `packed` (train.pack_rates) asks for that pass and is refused for SS/MSS.
        """
        if packed and self.strategy != "ms":
            raise ValueError("packing configurations into one pass needs the shared-LoRA (ms) strategy")
        if self.strategy == "ms" and len(grid) > 1 and merged.mergeable(self.llm_decoder()):
            return self._merged_ce([self.build(feats, r, targets) for r in grid])
        out = []
        for r in grid:
            emb, mask, lab = self.build(feats, r, targets)
            out.append(self._token_ce(emb, mask, lab).sum())
        return out

    def llm_decoder(self):
        """The LLM's decoder stack (a LlamaModel for Llama), under peft's wrapper."""
        return causal_lm(self.llm).get_decoder()

    def _merged_ce(self, built: list[tuple]) -> list[torch.Tensor]:
        """ce_sums of several configurations' (inputs_embeds, mask, labels) in one merged LLM pass."""
        lm = causal_lm(self.llm)
        inputs, keeps, golds = [], [], []
        for emb, mask, lab in built:
            gold = lab[:, 1:]
            keep = gold != -100  # (B, L-1)
            windows = query_windows(keep)  # (B, Q)
            inputs.append((emb, mask, windows))
            keeps.append(keep.gather(1, windows))  # (B, Q)
            golds.append(gold[keep])
        hidden = merged.hidden_at_windows(lm.get_decoder(), inputs)  # per configuration (B, Q, D)
        head = lm.get_output_embeddings()
        # the output layer configuration by configuration: over all of them at once, the backward's
        # (N, vocabulary) gradients were one transient, 1.5x the step's peak at Llama-3.2-1B size
        return [torch.nn.functional.cross_entropy(head(h[k]).float(), g, reduction="sum")
                for h, k, g in zip(hidden, keeps, golds, strict=True)]

    def _token_ce(self, emb, mask, lab) -> torch.Tensor:
        """(B, L-1) cross-entropy of each next token, 0 where there is no target. The output layer
        runs only at the positions the loss reads (the transcript's and EOS): at Llama 3's 128,256-wide
        vocabulary, logits over the media and prompt positions would be most of a step's memory. So
        does the last decoder layer beside its keys and values (last_layer.py)."""
        lm = causal_lm(self.llm)
        gold = lab[:, 1:]
        keep = gold != -100  # (B, L-1)
        decoder = lm.get_decoder()
        with last_layer_at(decoder, query_windows(keep)):  # the last layer's queries only where keep is
            h = decoder(inputs_embeds=emb, attention_mask=mask).last_hidden_state[:, :-1]  # (B, L-1, D)
        logits = lm.get_output_embeddings()(h[keep])  # (N, V)
        ce = torch.nn.functional.cross_entropy(logits.float(), gold[keep], reduction="none")  # (N,)
        return torch.zeros(gold.shape, dtype=ce.dtype, device=ce.device).masked_scatter(keep, ce)
