"""issue 21's fast paths against the code they replace: the last layer only where the loss reads, and
a search step's matmul attention. Each equals the plain computation."""

import platform

import pytest
import torch
from model_helpers import as_trained, input_dependent

from mavsr_cli import config as C
from mavsr_cli.datasets import synth
from mavsr_cli.decoding import _search_mask, beam_search, generate
from mavsr_cli.model import attention, kv_cache
from mavsr_cli.model import llm as llm_mod
from mavsr_cli.model.build import build_model
from mavsr_cli.model.kv_cache import in_place_cache
from mavsr_cli.model.last_layer import last_layer_at, query_windows
from mavsr_cli.model.step import LlamaStep, _AsModule, _linear, _onednn, _product, _rms_norm, one_token_step
from mavsr_cli.rates import Rates


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A 2-layer Llama with grouped-query attention (4 heads over 2), loaded as mavsr loads one."""
    d = llm_mod.tiny(tmp_path_factory.mktemp("llm"), synth.vocabulary() + "transcribe text".split(), hidden=64,
                     layers=2, heads=4)
    model, _ = llm_mod.load(str(d))
    return model


def test_query_windows_hold_every_kept_position():
    keep = torch.zeros(3, 12, dtype=torch.bool)
    keep[0, 7:11] = True  # 4 positions
    keep[1, 2:4] = True
    keep[2, 0] = True
    w = query_windows(keep)
    assert w.shape == (3, 4) and int(w.min()) >= 0 and int(w.max()) < 12
    for i in range(3):
        assert set(keep[i].nonzero().squeeze(1).tolist()) <= set(w[i].tolist())
        assert len(set(w[i].tolist())) == 4  # no position twice


@pytest.mark.parametrize("padded", [True, False])
def test_the_last_layer_only_at_the_loss_positions_equals_the_full_layer(lm, padded):
    """Outputs at the window positions and the gradient reaching the input equal the full layer's
    (padded: sdpa's 4-D mask; unpadded: no mask, causal); the other positions were not computed."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 20, 64, generator=g, requires_grad=True)
    mask = torch.ones(3, 20, dtype=torch.long)
    if padded:
        mask[1, 15:] = 0
        mask[2, 11:] = 0
    keep = torch.zeros(3, 20, dtype=torch.bool)
    keep[0, 14:19], keep[1, 10:14], keep[2, 6:10] = True, True, True
    decoder = lm.get_decoder()
    full = decoder(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    (gf,) = torch.autograd.grad(full[keep].square().sum(), emb)
    with last_layer_at(decoder, query_windows(keep)) as fast:
        part = decoder(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    assert fast and type(decoder.layers[-1]).forward is decoder.layers[-1].forward.__func__  # restored
    (gp,) = torch.autograd.grad(part[keep].square().sum(), emb)
    torch.testing.assert_close(part[keep], full[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gp, gf, rtol=1e-4, atol=1e-5)
    assert float(part[0, :5].detach().abs().max()) == 0.0  # never computed there


def _sdpa(q, k, v, mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = q.shape[1] // k.shape[1], True
    return sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)[0]


def test_a_one_token_steps_matmul_attention_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(6, 4, 1, 64, generator=g), torch.randn(6, 2, 9, 64, generator=g), torch.randn(6, 2, 9, 64)
    mask = torch.ones(6, 1, 1, 9, dtype=torch.bool)
    mask[2, ..., :4] = False  # left padding
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    got, _ = attention.attention(module, q, k, v, mask, scaling=0.125)
    torch.testing.assert_close(got, _sdpa(q, k, v, mask), rtol=1e-5, atol=1e-6)


def _rows_keys(layer) -> list[torch.Tensor]:
    """Every row's keys and values (N, Hkv, T, hd) as a cache layer holds them, in either layout."""
    if layer.shared == 1:
        return [layer.keys, layer.values]
    pk, pv, gk, gv = layer.parts()
    return [torch.cat([p.repeat_interleave(layer.shared, 0), x], 2) for p, x in ((pk, gk), (pv, gv))]


def test_a_beam_cache_holding_the_prompt_once_gives_every_row_the_repeated_layouts_keys():
    """share_prompt against batch_repeat_interleave through steps, beams moving within their
    utterance, and a finished utterance's rows leaving: the same keys and values in every row, and
    the prompt stored once per (remaining) utterance."""
    g = torch.Generator().manual_seed(0)
    kv = lambda n, t: [torch.randn(n, 2, t, 4, generator=g) for _ in range(2)]  # noqa: E731
    caches = [in_place_cache(3), in_place_cache(3)]
    prompt = kv(3, 5)  # 3 utterances, a 5-token prompt
    for c in caches:
        c.update(*prompt, 0)
    repeated, shared = caches[0].layers[0], caches[1].layers[0]
    before = shared.buf[0].untyped_storage().data_ptr()
    repeated.batch_repeat_interleave(2)
    shared.share_prompt(2)
    assert all(x.untyped_storage().data_ptr() != before for x in (*shared.buf, shared.keys, shared.values))  # freed
    for idx in ([1, 0, 2, 2, 5, 4], [1, 1, 4, 5]):  # beams move; then utterance 1's rows leave
        new = kv(len(repeated.keys), 1)
        repeated.update(*new)
        shared.write(*new)
        for a, b in zip(_rows_keys(repeated), _rows_keys(shared), strict=True):
            assert torch.equal(a, b)
        for layer in (repeated, shared):
            layer.reorder_cache(torch.tensor(idx))
    new = kv(4, 1)
    repeated.update(*new)
    shared.write(*new)
    for a, b in zip(_rows_keys(repeated), _rows_keys(shared), strict=True):
        assert a.shape == (4, 2, 8, 4) and torch.equal(a, b)
    assert shared.keys is shared.buf[0]  # no view keeps the three utterances' prompts alive
    assert torch.equal(shared.update(*kv(4, 1))[0][:, :, :8], _rows_keys(shared)[0][:, :, :8])  # transformers' call
    assert shared.buf[0].shape[0] == 2 and shared.get_seq_length() == repeated.get_seq_length() + 1 == 9


def test_the_shared_prompt_attention_equals_the_per_row_one():
    """one_query_shared (an utterance's prompt once, all its beams' queries in one product) against
    one_query over the repeated rows: grouped-query heads, left padding, 3 utterances of 4 beams."""
    g = torch.Generator().manual_seed(1)
    u, beams, tp, tg = 3, 4, 7, 5
    q = torch.randn(u * beams, 4, 16, generator=g)
    pk, pv = (torch.randn(u, 2, tp, 16, generator=g) for _ in range(2))
    gk, gv = (torch.randn(u * beams, 2, tg, 16, generator=g) for _ in range(2))
    hidden = torch.zeros(u * beams, 1, 1, tp + tg, dtype=torch.bool)
    hidden[beams:2 * beams, ..., :3] = True  # the second utterance's prompt is left-padded
    keys, values = (torch.cat([p.repeat_interleave(beams, 0), x], 2) for p, x in ((pk, gk), (pv, gv)))
    want = attention.one_query(q, keys, values, 0.25, hidden=hidden)
    got = attention.one_query_shared(q, pk, pv, gk, gv, beams, 0.25, hidden=hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, attention.one_query_shared(q, pk, pv, gk, gv, beams, 0.25))  # the mask counts


def _model(tmp_path, strategy: str = "ms", frozen: str = "float32"):
    d = llm_mod.tiny(tmp_path / "llm", synth.vocabulary() + "transcribe speech and video to text".split(), hidden=64,
                     layers=2, heads=4)
    cfg = C.from_dict({"model": {"llm": str(d), "projector_hidden": 16,
                                 "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "strategy": strategy},
                                 "frozen_dtype": frozen}, "train": {"precision": "auto"}})
    return input_dependent(as_trained(build_model(cfg, 32, 32, seed=0, bf16=frozen == "bfloat16").eval()))


def test_beam_search_with_the_matmul_step_attention_gives_sdpas_hypotheses(tmp_path):
    """The step attention llm.load installs returns, through a whole batched beam search with
    utterances finishing early, the hypotheses of transformers' SDPA."""
    m = _model(tmp_path)
    llm = m.llm.get_base_model()
    assert llm.config._attn_implementation == attention.NAME  # llm.load installed it
    eos = m.tokenizer.eos_token_id
    with torch.no_grad():  # an EOS that one utterance reaches early, so its rows leave the batch
        w = llm.get_input_embeddings().weight
        w[eos] += 8 * torch.nn.functional.normalize(torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0)),
                                                    dim=0)
    g = torch.Generator().manual_seed(3)
    lens = [100, 60, 80, 40]
    f = {"audio": (torch.randn(4, 100, 32, generator=g), torch.tensor(lens)),
         "video": (torch.randn(4, 50, 32, generator=g), torch.tensor([n // 2 for n in lens]))}
    emb, mask, _ = m.build(f, Rates(4, 2), None, left_pad=True)
    ours = beam_search(llm, emb, mask, eos, 5, 12)
    llm.set_attn_implementation("sdpa")
    try:
        theirs = beam_search(llm, emb, mask, eos, 5, 12)
    finally:
        llm.set_attn_implementation(attention.NAME)
    assert ours == theirs and len({tuple(h) for h in ours}) > 1
    assert any(len(h) < 12 for h in ours)  # an utterance finished early
    assert generate(m, f, Rates(4, 2), 12, beam=5)[0] == [" ".join(t.split()) for t in
                                                          m.tokenizer.batch_decode(ours, skip_special_tokens=True)]


def _sdpa_everywhere(monkeypatch):
    """Attend as on a GPU: no device for mavsr's one-query attention, and it fails if called."""
    monkeypatch.setattr(attention, "ONE_QUERY_DEVICES", ())
    monkeypatch.setattr(attention, "one_query", lambda *a, **k: pytest.fail("one_query ran"))
    monkeypatch.setattr(attention, "one_query_shared", lambda *a, **k: pytest.fail("one_query_shared ran"))


@pytest.mark.parametrize("strategy,frozen,hooked,gpu_attention", [
    ("ms", "float32", False, False), ("mss", "float32", False, False), ("ms", "bfloat16", False, False),
    ("ms", "float32", True, False), ("ms", "float32", False, True), ("ms", "bfloat16", False, True)])
def test_the_llama_step_gives_the_full_calls_logits(tmp_path, monkeypatch, strategy, frozen, hooked, gpu_attention):
    """Five one-token steps over 3 left-padded prompts (15 rows, as a beam of 5 has them): the step's
    logits are the full transformers call's, number for number, with MS's one LoRA, MSS's two summed,
    a bf16 LLM under autocast, and hooks on a projection, a norm and an activation (a hooked model
    takes the full call; a step made for it anyway calls those modules as themselves, on the full
    call's (N, 1, D), and leaves what their hooks keep as they saw it); the two write equal caches.
    gpu_attention: both attend with transformers' SDPA, the branch a GPU takes, run here on the CPU."""
    if gpu_attention:
        _sdpa_everywhere(monkeypatch)
    m = _model(tmp_path, strategy, frozen)
    llm = m.llm.get_base_model()
    assert LlamaStep.fits(llm) and isinstance(one_token_step(llm, 8), LlamaStep)
    layer, seen = llm.model.layers[0], {"step": [], "full": []}
    if hooked:
        for mod in (layer.self_attn.q_proj, layer.post_attention_layernorm, layer.mlp.act_fn):
            mod.register_forward_hook(lambda mod, args, out: seen[seen["now"]].append((args[0], out)))
        assert not LlamaStep.fits(llm) and not isinstance(one_token_step(llm, 8), LlamaStep)  # the full call
    g = torch.Generator().manual_seed(2)
    f = {"audio": (torch.randn(3, 60, 32, generator=g), torch.tensor([60, 36, 48])),
         "video": (torch.randn(3, 30, 32, generator=g), torch.tensor([30, 18, 24]))}
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=frozen == "bfloat16")
    with torch.no_grad(), bf16:
        emb, mask, _ = m.build(f, Rates(4, 2), None, left_pad=True)
        emb, mask = emb.repeat_interleave(5, 0), mask.repeat_interleave(5, 0)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        caches = [in_place_cache(5), in_place_cache(5)]
        seen["now"] = "prompt"
        seen["prompt"] = []
        for c in caches:
            llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=c, use_cache=True)
        step, full = LlamaStep(llm, mask.shape[1] + 5), _search_mask(mask, 5)
        resolved = [f for p in step.proj for f in p.values()] + [f for n in step.norms for f in n]
        unresolved = [f for f in resolved + [step.final_norm, step.head, step.act[0]] if isinstance(f, _AsModule)]
        assert len(unresolved) == (3 if hooked else 0)
        for t in range(5):
            tok = llm.get_input_embeddings()(torch.randint(0, 100, (15, 1), generator=g))
            at, attend = pos[:, -1] + t + 1, full[..., : mask.shape[1] + t + 1]
            seen["now"] = "full"
            ref = llm(inputs_embeds=tok, attention_mask=attend, position_ids=at[:, None], cache=caches[0],
                      use_cache=True).logits[:, -1]
            seen["now"] = "step"
            got = step(tok, at, attend, caches[1])
            assert got.dtype == ref.dtype and torch.equal(got, ref), f"step {t}"
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert len(seen["step"]) == len(seen["full"]) == (15 if hooked else 0)
    for (arg, out), (ref_arg, ref_out) in zip(seen["step"], seen["full"], strict=True):
        assert torch.equal(arg, ref_arg) and torch.equal(out, ref_out)  # as the hooks saw them: not overwritten


@pytest.mark.parametrize("strategy,frozen", [("ms", "float32"), ("mss", "float32"), ("ms", "bfloat16")])
def test_the_llama_step_on_a_prompt_held_once_gives_the_full_calls_logits(tmp_path, strategy, frozen):
    """The step's branch for a beam's cache holding each prompt once (the CPU's): five steps over 3
    left-padded prompts of 5 beams each, the beams moving within their utterance after every step,
    against the full transformers call on the prompts repeated per beam: the same logits to rounding.
    In float32 that step reads every LoRA projection merged (MS's adapter, MSS's two), on copies:
    the model's weights stay as they were; a bf16 LLM keeps its adapters apart."""
    m = _model(tmp_path, strategy, frozen)
    llm = m.llm.get_base_model()
    before = {n: p.clone() for n, p in llm.named_parameters()}
    g = torch.Generator().manual_seed(6)
    f = {"audio": (torch.randn(3, 60, 32, generator=g), torch.tensor([60, 36, 48])),
         "video": (torch.randn(3, 30, 32, generator=g), torch.tensor([30, 18, 24]))}
    tol = {"rtol": 2e-2, "atol": 2e-2} if frozen == "bfloat16" else {"rtol": 1e-5, "atol": 1e-5}
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=frozen == "bfloat16")
    with torch.no_grad(), bf16:
        emb, mask, _ = m.build(f, Rates(4, 2), None, left_pad=True)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        caches = [in_place_cache(5), in_place_cache(5)]
        for c in caches:
            llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=c, use_cache=True)
        step = one_token_step(llm, mask.shape[1] + 5, beams=5)
        assert step.shares_prompt and not one_token_step(llm, mask.shape[1] + 5).shares_prompt
        products = [f for p in step.proj for f in p.values()] + [step.head]
        assert sum(getattr(f, "merged", False) for f in products) == (4 if frozen == "float32" else 0)  # q, v x 2
        x86 = platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available()
        onednn = frozen == "float32" and x86
        assert [getattr(f, "onednn", False) for f in products] == [onednn] * 15
        assert all(torch.equal(p, before[n]) for n, p in llm.named_parameters())
        caches[0].batch_repeat_interleave(5)
        kv_cache.share_prompt(caches[1], 5)
        full, last = _search_mask(mask, 5).repeat_interleave(5, 0), pos[:, -1].repeat_interleave(5)
        for t in range(5):
            tok = llm.get_input_embeddings()(torch.randint(0, 100, (15, 1), generator=g))
            at, attend = last + t + 1, full[..., : mask.shape[1] + t + 1]
            ref = llm(inputs_embeds=tok, attention_mask=attend, position_ids=at[:, None], cache=caches[0],
                      use_cache=True).logits[:, -1]
            got = step(tok, at, attend, caches[1])
            assert got.dtype == ref.dtype
            torch.testing.assert_close(got, ref, **tol, msg=f"step {t}")
            idx = torch.cat([u * 5 + torch.randperm(5, generator=g) for u in range(3)])
            for c in caches:
                c.reorder_cache(idx)


@pytest.mark.parametrize("out,inp", [(96, 64), (64, 160), (501, 64), (512, 2048), (256, 8192)])
def test_the_beam_steps_onednn_products_do_not_depend_on_the_rows_beside(out, inp):
    """oneDNN's product (the CPU beam step's) gives a row the same numbers whether it runs with 1 or
    119 other rows, first or last, on one thread or two (Llama-3.2-1B's widths among the shapes), as
    torch.mm does, and F.linear's numbers to rounding: a batch of utterances decodes as each alone,
    and as its utterances finish. (One row alone, which a beam never has, takes another kernel.)"""
    g = torch.Generator().manual_seed(out)
    w, b = torch.randn(out, inp, generator=g) * inp ** -0.5, torch.randn(out, generator=g)
    x = torch.randn(120, inp, generator=g)
    if not _onednn(w):
        pytest.skip("oneDNN's product is taken on an x86-64 CPU only")
    threads = torch.get_num_threads()
    try:
        for n, bias in ((1, None), (2, b)):
            torch.set_num_threads(n)
            product = _product(w, bias, rounding=True)
            assert product.onednn and not getattr(_product(w, bias), "onednn", False)
            full = product(x)
            torch.testing.assert_close(full, torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-5)
            for m in (2, 3, 15, 16, 30, 45, 60, 75, 90, 105, 119):
                assert torch.equal(product(x[:m].contiguous()), full[:m]), (n, m)
                assert torch.equal(product(x[-m:].contiguous()), full[-m:]), (n, m)
    finally:
        torch.set_num_threads(threads)


def test_a_batched_beam_with_the_steps_gpu_attention_gives_sdpas_hypotheses(tmp_path, monkeypatch):
    """The step's SDPA branch (what a GPU runs), through a whole batched beam search on the CPU: the
    hypotheses of the full transformers call with SDPA."""
    m = _model(tmp_path)
    llm = m.llm.get_base_model()
    g = torch.Generator().manual_seed(4)
    f = {"audio": (torch.randn(3, 80, 32, generator=g), torch.tensor([80, 44, 60])),
         "video": (torch.randn(3, 40, 32, generator=g), torch.tensor([40, 22, 30]))}
    with torch.no_grad():
        emb, mask, _ = m.build(f, Rates(4, 2), None, left_pad=True)
    _sdpa_everywhere(monkeypatch)
    assert isinstance(one_token_step(llm, 8), LlamaStep)
    ours = beam_search(llm, emb, mask, m.tokenizer.eos_token_id, 4, 10)
    llm.set_attn_implementation("sdpa")
    try:
        assert not isinstance(one_token_step(llm, 8), LlamaStep)  # the full call
        theirs = beam_search(llm, emb, mask, m.tokenizer.eos_token_id, 4, 10)
    finally:
        llm.set_attn_implementation(attention.NAME)
    assert ours == theirs and len({tuple(h) for h in ours}) > 1


@pytest.mark.parametrize("beam", [1, 4])
def test_the_search_makes_its_tensors_where_the_model_is(tmp_path, beam):
    """What a GPU needs, checked on the CPU: with torch's default device set to meta, a tensor that
    the input builder or the search makes without naming a device has no data, and the search fails
    or its hypotheses change (both happened before they named one); here they equal a plain run's."""
    m = _model(tmp_path)
    g = torch.Generator().manual_seed(5)
    f = {"audio": (torch.randn(3, 80, 32, generator=g), torch.tensor([80, 44, 60])),
         "video": (torch.randn(3, 40, 32, generator=g), torch.tensor([40, 22, 30]))}
    want = generate(m, f, Rates(4, 2), 8, beam=beam)
    torch.set_default_device("meta")
    try:
        got = generate(m, f, Rates(4, 2), 8, beam=beam)
    finally:
        torch.set_default_device(None)
    assert got == want and all(want[0])  # texts, input lengths


def test_other_attentions_take_the_full_call(lm):
    lm.set_attn_implementation("eager")
    try:
        assert not LlamaStep.fits(lm) and not isinstance(one_token_step(lm, 8), LlamaStep)
    finally:
        lm.set_attn_implementation(attention.NAME)
    assert LlamaStep.fits(lm)


def test_a_layer_the_step_cannot_resolve_is_called_as_the_module(tmp_path):
    """A hook, or LoRA dropout while training, keeps the module's own forward; a norm too."""
    llm = _model(tmp_path, "ms", "float32").llm.get_base_model()
    q = llm.model.layers[0].self_attn.q_proj
    assert not isinstance(_linear(q), _AsModule)
    handle = q.register_forward_hook(lambda *a: None)
    assert _linear(q).mod is q
    handle.remove()
    q.lora_dropout[q.active_adapters[0]] = torch.nn.Dropout(0.1).eval()
    assert not isinstance(_linear(q), _AsModule) and _linear(q.train()).mod is q
    norm = llm.model.norm
    assert not isinstance(_rms_norm(norm), _AsModule)
    handle = norm.register_forward_pre_hook(lambda *a: None)
    assert _rms_norm(norm).mod is norm
    handle.remove()
    norm.forward = norm.forward  # patched on the instance (as accelerate's hooks do)
    assert _rms_norm(norm).mod is norm


@pytest.mark.parametrize("case", ["biases", "one_kv_head_per_query_head", "bf16_weights_fp32_lora"])
def test_the_llama_step_equals_the_full_call_beyond_mavsrs_own_llms(tmp_path, case):
    """Llamas mavsr's tiny() does not make: projections with biases (the step's addmm), as many key
    heads as query heads (no grouping), and a bf16 LLM run without autocast whose LoRA peft keeps in
    float32 (bf16 activations meet float32 weights: the step's out-of-place adds and casts). Four
    one-token steps over 6 left-padded rows: logits and caches equal the full call's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    kv_heads = 4 if case == "one_kv_head_per_query_head" else 2
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads,
                      attention_bias=case == "biases", mlp_bias=case == "biases", max_position_embeddings=64)
    net = LlamaForCausalLM(cfg)
    if case == "biases":
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith(".bias"):
                    p.normal_()  # made zero at init: nonzero, or an addmm mistake would not show
    net.save_pretrained(tmp_path / "llm")
    llm_mod.word_tokenizer(["a", "b"]).save_pretrained(tmp_path / "llm")
    dtype = torch.bfloat16 if case == "bf16_weights_fp32_lora" else torch.float32
    llm, _ = llm_mod.load(str(tmp_path / "llm"), dtype)
    if case == "bf16_weights_fp32_lora":
        llm = llm_mod.add_lora(llm, 4, 8, 0.0, ("q_proj", "v_proj"), ["ms"])
        with torch.no_grad():
            for name, p in llm.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)  # B starts at zero: nonzero, so the adapter adds something
        assert {p.dtype for n, p in llm.named_parameters() if "lora_" in n} == {torch.float32}
        llm = llm.get_base_model()
    step = one_token_step(llm, 20)
    assert isinstance(step, LlamaStep)
    assert not any(isinstance(f, _AsModule) for p in step.proj for f in p.values())
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(6, 12, dtype=torch.bool)
    mask[1, :5], mask[4, :3] = False, False  # left padding
    emb = torch.randn(6, 12, 64, generator=g).to(dtype)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    caches = [in_place_cache(4), in_place_cache(4)]
    with torch.no_grad():
        for c in caches:
            llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=c, use_cache=True)
        full = _search_mask(mask, 4)
        for t in range(4):
            tok = llm.get_input_embeddings()(torch.randint(0, 97, (6, 1), generator=g))
            at, attend = pos[:, -1] + t + 1, full[..., : mask.shape[1] + t + 1]
            ref = llm(inputs_embeds=tok, attention_mask=attend, position_ids=at[:, None], cache=caches[0],
                      use_cache=True).logits[:, -1]
            got = step(tok, at, attend, caches[1])
            assert got.dtype == ref.dtype == dtype and torch.equal(got, ref), f"step {t}"
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
