"""The LLM decoder: any transformers causal LM (Llama 3.x by default), frozen, with peft LoRA.

`load` goes through AutoTokenizer/AutoModelForCausalLM.from_pretrained, as for a real Llama.
`tiny` builds a small Llama and a word-level tokenizer from configs and saves both in the real
on-disk format, so tests and the synthetic recipe load them through the same `load`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MavsrError

ADAPTER_MS = "ms"  # the shared LoRA used by every rate configuration (docs/method.md, MS)


def causal_lm(llm):
    """The causal LM under peft's wrapper (its LoRA layers are inside it, active as set): calling it
    directly skips the wrapper's per-call bookkeeping, which a search pays once per token."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def adapters_for(strategy: str, tag: str) -> list[str]:
    """The LoRA adapters active for one rate configuration (docs/method.md, Matryoshka training):
    MS: the shared one; SS: the configuration's own (named by its rate tag); MSS: both, summed."""
    if strategy == "ms":
        return [ADAPTER_MS]
    if strategy == "ss":
        return [tag]
    if strategy == "mss":
        return [ADAPTER_MS, tag]
    raise ValueError(f"unknown LoRA strategy {strategy!r}")


def all_adapters(strategy: str, tags: list[str]) -> list[str]:
    names: list[str] = []
    for t in tags:
        names += [a for a in adapters_for(strategy, t) if a not in names]
    return names


def load(name_or_path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except OSError as e:
        raise MavsrError(f"cannot load LLM from {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise MavsrError(f"LLM tokenizer at {name_or_path!r} has no BOS/EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out; any id will do
    if model.config._attn_implementation == "sdpa":  # a search step's attention on the CPU (attention.py)
        from . import attention

        attention.install(model)
    model.eval().requires_grad_(False)
    return model, tok


def add_lora(model, rank: int, alpha: int, dropout: float, targets: tuple[str, ...], names: list[str]):
    """Wrap the frozen LLM with one peft LoRA adapter per name (same shape for all)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, cfg)
    return peft_model


def word_tokenizer(words: list[str]):
    """A word-level fast tokenizer over `words` with <s>, </s>, <pad>, <unk> and punctuation."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    punct = [".", ",", "?", "!", "'"]
    vocab = {w: i for i, w in enumerate(specials + punct + sorted(set(words) - set(specials) - set(punct)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def tiny(out_dir: Path, words: list[str], hidden: int = 192, layers: int = 2, heads: int = 4,
         seed: int = 0) -> Path:
    """A small random Llama with a word-level tokenizer over `words`, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(words)
    vocab = tok.get_vocab()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"], tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)
