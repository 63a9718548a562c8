"""Model parts through their real loading paths: tiny models saved to disk and loaded back."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import as_trained, input_dependent

from mavsr_cli import config as C
from mavsr_cli.datasets import synth
from mavsr_cli.decoding import beam_search, generate, greedy_search
from mavsr_cli.errors import MavsrError
from mavsr_cli.model import kv_cache
from mavsr_cli.model import llm as llm_mod
from mavsr_cli.model.audio_encoder import WhisperAudioEncoder
from mavsr_cli.model.build import build_model
from mavsr_cli.model.video_encoder import SmallVideoEncoder
from mavsr_cli.rates import Rates


def _loss(m, feats, rates, targets):
    """Mean next-token cross-entropy of one configuration over the transcript + EOS tokens."""
    return m.ce_sums(feats, [rates], targets)[0] / sum(len(t) + 1 for t in targets)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    WhisperAudioEncoder.tiny(d / "whisper", d_model=32, layers=1, heads=2)
    SmallVideoEncoder.tiny(d / "video", dim=32, layers=1, channels=8)
    llm_mod.tiny(d / "llm", synth.vocabulary() + "transcribe speech and video to text".split(), hidden=32,
                 layers=1, heads=2)
    return d


def test_whisper_loads_with_real_weights(parts):
    from transformers import WhisperForConditionalGeneration

    enc = WhisperAudioEncoder.load(str(parts / "whisper"))
    ref = WhisperForConditionalGeneration.from_pretrained(parts / "whisper").model.encoder
    for (k, a), b in zip(enc.encoder.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    wav = np.random.default_rng(0).normal(0, 0.1, 16000 * 2).astype(np.float32)
    fast = enc(wav)
    assert fast.shape == (100, 32)  # 50 Hz
    enc.mode = "faithful"
    assert enc(wav).shape == (100, 32)


@pytest.mark.parametrize("mode", ["fast", "faithful"])
def test_whisper_input_normalisation_is_the_reference_codes_layer_norm(parts, mode):
    """audio_encoder.normalize: the clip is scaled to zero mean and unit variance (layer_norm over
    the waveform, eps 1e-8, as the reference code) before the log-mel; off, the raw clip goes in."""
    from mavsr_cli.config import AudioEncoderConfig

    raw = WhisperAudioEncoder.load(str(parts / "whisper"), mode)
    norm = WhisperAudioEncoder.from_config(str(parts / "whisper"), AudioEncoderConfig(mode=mode, normalize=True))
    wav = np.random.default_rng(2).normal(0.02, 0.05, 16000).astype(np.float32)
    t = torch.from_numpy(wav)
    by_torch = torch.nn.functional.layer_norm(t, t.shape, eps=1e-8).numpy()
    with torch.no_grad():
        torch.testing.assert_close(norm(wav), raw(by_torch), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(norm(wav * 3 + 0.1), norm(wav), atol=1e-3, rtol=1e-3)  # level-free
    assert (norm.mel(wav) - raw.mel(wav)).mean() > 0.3  # a clip at 0.05 rms: the whole log-mel shifts up


@pytest.mark.parametrize("mode", ["fast", "faithful"])
def test_whisper_encode_batch_equals_one_utterance_at_a_time(parts, mode):
    """extract-features encodes several clips per call (faithful: one batch of 30 s windows)."""
    enc = WhisperAudioEncoder.load(str(parts / "whisper"), mode)
    rng = np.random.default_rng(4)
    wavs = [rng.normal(0, 0.1, n).astype(np.float32) for n in (16000, 5120, 24960)]
    with torch.no_grad():
        h, lens = enc.encode_batch(wavs)
        assert h.shape == (3, 78, 32) and lens.tolist() == [50, 16, 78]
        for k, w in enumerate(wavs):
            torch.testing.assert_close(h[k, : lens[k]], enc(w), atol=1e-5, rtol=1e-5)
            assert not h[k, lens[k]:].any()  # padded as pad_batch pads
        if enc.batch_invariant:  # extract-features and serve batch only such an encoder: the same to the bit
            assert all(torch.equal(h[k, : lens[k]], enc(w)) for k, w in enumerate(wavs))  # as transcribe encodes
            for grp in ([0, 1], [2, 0, 1], [1]):
                g, n = enc.encode_batch([wavs[i] for i in grp])
                assert all(torch.equal(g[j, : n[j]], h[i, : lens[i]]) for j, i in enumerate(grp))


def test_encoding_is_grouped_only_for_an_encoder_whose_rows_do_not_depend_on_the_batch():
    """extraction.encode_grouped, which extract-features and serve share: ENCODE_BATCH clips per call,
    longest first, for a batch-invariant encoder; one per call otherwise; features in the items' order."""
    from mavsr_cli.extraction import ENCODE_BATCH, encode_grouped

    class Recorder:
        def __init__(self, batch_invariant):
            self.batch_invariant, self.calls = batch_invariant, []

        def encode_batch(self, clips):  # row b: clip b's values, zero-padded to the longest
            self.calls.append([len(c) for c in clips])
            h = torch.zeros(len(clips), max(len(c) for c in clips), 1)
            for b, c in enumerate(clips):
                h[b, : len(c), 0] = torch.as_tensor(c)
            return h, torch.tensor([len(c) for c in clips])

    items = [np.arange(n, dtype=np.float32) + n for n in (3, 9, 1, 4, 7, 2, 8, 5, 6, 10)]
    for invariant in (True, False):
        enc = Recorder(invariant)
        out = encode_grouped(enc, items)
        assert all(torch.equal(o[:, 0], torch.as_tensor(x)) for o, x in zip(out, items, strict=True))
        step = ENCODE_BATCH if invariant else 1
        lengths = sorted((len(x) for x in items), reverse=True)
        assert enc.calls == [lengths[i:i + step] for i in range(0, len(items), step)]

    class FailsOnTwo(Recorder):  # the clip of length 2 cannot be encoded
        def encode_batch(self, clips):
            out = super().encode_batch(clips)
            if any(len(c) == 2 for c in clips):
                raise ValueError("bad clip")
            return out

    enc = FailsOnTwo(True)
    with pytest.raises(ValueError):  # extract-features: the stage fails
        encode_grouped(enc, items)
    enc.calls, sizes = [], []
    out = encode_grouped(enc, items, isolate=True, on_call=sizes.append)  # serve: that clip fails alone
    assert enc.calls == [lengths[:8], lengths[8:], [2], [1]]  # only the failed call's group again, each alone
    assert sizes == [8, 1] and isinstance(out[5], ValueError)
    rest = [k for k in range(len(items)) if k != 5]
    assert all(torch.equal(out[k][:, 0], torch.as_tensor(items[k])) for k in rest)


def test_faithful_whisper_encodes_long_audio_in_30_s_windows_never_cutting_it(parts):
    """A 40 s or 61 s clip: every 20 ms of it gets a frame (it was cut at 30 s, 1500 frames), each
    30 s window encoded as Whisper was trained; the first window's frames are those of its 30 s alone."""
    enc = WhisperAudioEncoder.load(str(parts / "whisper"), "faithful")
    rng = np.random.default_rng(6)
    with torch.no_grad():
        for seconds in (40, 61):
            wav = rng.normal(0, 0.05, 16000 * seconds).astype(np.float32)
            h = enc(wav)
            assert h.shape == (50 * seconds, 32)
            torch.testing.assert_close(h[:1500], enc(wav[: 16000 * 30]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h[1500:3000], enc(wav[16000 * 30: 16000 * 60]), atol=1e-5, rtol=1e-5)
        g, n = enc.encode_batch([wav, wav[:16000]])  # a batch with a long clip: each on its own
        assert n.tolist() == [3050, 50] and torch.equal(g[0], h) and not g[1, 50:].any()


def test_video_encoders_encode_batch_equals_one_clip_at_a_time(parts):
    from mavsr_cli.model.avhubert import AVHubertConfig, AVHubertVideoEncoder

    torch.manual_seed(0)
    avh = AVHubertVideoEncoder(AVHubertConfig(encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                                              encoder_attention_heads=2, conv_pos=16, conv_pos_groups=4,
                                              resnet_channels=8)).eval()
    small = SmallVideoEncoder.load(parts / "video").eval()
    g = torch.Generator().manual_seed(5)
    clips = [torch.randn(n, 88, 88, generator=g) for n in (30, 12, 21)]
    for enc in (avh, small):
        with torch.no_grad():
            h, lens = enc.encode_batch(clips)
            assert lens.tolist() == [30, 12, 21] and h.shape[1] == 30
            for k, c in enumerate(clips):
                torch.testing.assert_close(h[k, : lens[k]], enc(c), atol=1e-5, rtol=1e-5)
                assert not h[k, lens[k]:].any()


def test_whisper_batched_fast_path_equals_one_utterance_at_a_time(parts):
    enc = WhisperAudioEncoder.load(str(parts / "whisper"))
    rng = np.random.default_rng(1)
    mels = [enc.mel(rng.normal(0, 0.1, n).astype(np.float32)) for n in (16000, 5120, 24960)]
    h, lens = enc.encode_mels(mels)  # padded to the longest
    assert h.shape == (3, 78, 32) and lens.tolist() == [50, 16, 78]
    for k, m in enumerate(mels):
        one = enc.encode_mel(m)
        assert one.shape == (lens[k], 32)
        assert torch.allclose(h[k, : lens[k]], one, atol=1e-5)  # padding changes nothing it keeps


def test_lm_warmup_batches_hold_similar_lengths_and_every_example_once():
    from mavsr_cli.stages.tiny_models import length_batches

    rng = np.random.default_rng(0)
    examples = [(list(range(int(n))), [k]) for k, n in enumerate(rng.integers(5, 90, 300))]
    batches = length_batches(examples, 32, torch.Generator().manual_seed(0))
    assert len(batches) == 10 and sorted(y[0] for b in batches for _, y in b) == list(range(300))
    padded = sum(max(len(x) for x, _ in b) * len(b) for b in batches)
    shuffled = sum(max(len(x) for x, _ in examples[i:i + 32]) * len(examples[i:i + 32]) for i in range(0, 300, 32))
    assert padded < 0.7 * shuffled  # lengths drawn evenly: random batches pad to about twice the mean
    again = length_batches(examples, 32, torch.Generator().manual_seed(0))
    assert [[y for _, y in b] for b in again] == [[y for _, y in b] for b in batches]  # a function of the seed


def test_whisper_without_encoder_weights_is_refused(parts, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "w"
    shutil.copytree(parts / "whisper", bad)
    state = {k: v for k, v in load_file(bad / "model.safetensors").items() if "encoder.layers" not in k}
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MavsrError, match="lacks encoder weights"):
        WhisperAudioEncoder.load(str(bad))
    with pytest.raises(MavsrError, match="cannot load Whisper"):
        WhisperAudioEncoder.load(str(tmp_path / "nowhere"))


def test_video_encoder_round_trip_and_errors(parts, tmp_path):
    v = SmallVideoEncoder.load(parts / "video")
    x = torch.randn(20, 88, 88)
    y = v(x)
    assert y.shape == (20, 32)
    assert torch.equal(SmallVideoEncoder.load(parts / "video")(x), y)
    with pytest.raises(MavsrError, match="no video encoder"):
        SmallVideoEncoder.load(tmp_path)


def _model(parts):
    cfg = C.from_dict({"model": {"llm": str(parts / "llm"), "projector_hidden": 16,
                                 "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}}})
    return build_model(cfg, 32, 32, seed=0)


def _feats(b=2):
    g = torch.Generator().manual_seed(0)
    return {"audio": (torch.randn(b, 100, 32, generator=g), torch.tensor([100, 60][:b])),
            "video": (torch.randn(b, 50, 32, generator=g), torch.tensor([50, 30][:b]))}


def test_llm_input_layout_and_loss_mask(parts):
    m = _model(parts)
    tok = m.tokenizer
    tg = [tok(s, add_special_tokens=False).input_ids for s in ("anna found the apple", "please move")]
    emb, mask, lab = m.build(_feats(), Rates(4, 2), tg)
    # [BOS] <audio> 25 </audio> <video> 25 </video> prompt(7) + 4 words + EOS for the first utterance
    assert int(mask[0].sum()) == 1 + 1 + 25 + 1 + 1 + 25 + 1 + len(m.prompt_ids) + 4 + 1
    assert int((lab[0] != -100).sum()) == 5 and int((lab[1] != -100).sum()) == 3  # transcript + EOS only
    assert lab[0][lab[0] != -100].tolist() == tg[0] + [tok.eos_token_id]
    assert torch.equal(emb[0, 1], m.markers[0])  # <audio> marker follows BOS
    short = m.build(_feats(), Rates(16, 5), tg)[1]
    assert int(short[0].sum()) < int(mask[0].sum())  # higher rates, fewer LLM input tokens


def test_trained_state_round_trips_into_a_fresh_model(parts, tmp_path):
    from safetensors.torch import load_file, save_file

    m = _model(parts)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # as if trained
    state = m.trainable_state()
    assert any("lora_A" in k for k in state) and any(k.startswith("projectors.") for k in state)
    assert not any("embed_tokens" in k or "mlp" in k for k in state)  # frozen parts stay out
    save_file(state, tmp_path / "s.safetensors")
    m.eval()
    tg = [[5, 6, 7], [8]]
    emb, mask, _ = m.build(_feats(), Rates(16, 5), tg)
    ref = m.llm(inputs_embeds=emb, attention_mask=mask).logits
    fresh = _model(parts)
    fresh.load_trainable(load_file(tmp_path / "s.safetensors"))
    fresh.eval()
    emb2, mask2, _ = fresh.build(_feats(), Rates(16, 5), tg)
    assert torch.equal(fresh.llm(inputs_embeds=emb2, attention_mask=mask2).logits, ref)
    with pytest.raises(MavsrError, match="does not match"):
        fresh.load_trainable({k: v for k, v in state.items() if "projectors" not in k})


def test_generation_is_deterministic_and_batch_independent(parts):
    m = _model(parts).eval()
    f = _feats()
    a, n_in = generate(m, f, Rates(4, 5), 6)
    b, _ = generate(m, f, Rates(4, 5), 6)
    assert a == b and len(a) == 2 and n_in[0] > n_in[1]
    single = {k: (x[:1], n[:1]) for k, (x, n) in f.items()}
    assert generate(m, single, Rates(4, 5), 6)[0][0] == a[0]


def test_mavsr_imports_before_and_after_transformers_in_a_fresh_process():
    code = "import mavsr_cli.cli, transformers; from transformers import WhisperFeatureExtractor; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-1500:]


def test_packed_configurations_give_the_same_losses_and_gradients(two_layers):
    m = _model(two_layers)
    m.train()
    tok = m.tokenizer
    tg = [tok("anna found the apple near the kitchen", add_special_tokens=False).input_ids,
          tok("please move", add_special_tokens=False).input_ids]
    f = _feats()

    def grads(losses):
        m.zero_grad()
        torch.stack(losses).mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    unpacked = [_loss(m, f, r, tg) for r in m.grid]
    g1 = grads(unpacked)
    packed = [s / sum(len(x) + 1 for x in tg) for s in m.ce_sums(f, m.grid, tg, packed=True)]
    g2 = grads(packed)
    torch.testing.assert_close(torch.stack(packed), torch.stack(unpacked).detach(), rtol=1e-5, atol=1e-5)
    assert set(g1) == set(g2)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def _strategy_model(parts, strategy):
    cfg = C.from_dict({"model": {"llm": str(parts / "llm"), "projector_hidden": 16,
                                 "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "strategy": strategy}}})
    return as_trained(build_model(cfg, 32, 32, seed=0)).eval()


def test_ss_uses_each_configurations_own_adapter(parts):
    m = _strategy_model(parts, "ss")
    adapters = {n.split(".lora_A.")[1].split(".")[0] for n, _ in m.named_parameters() if ".lora_A." in n}
    assert adapters == {"a4v2", "a4v5", "a16v2", "a16v5"}
    tg = [[5, 6, 7], [8]]
    f = _feats()
    before = {r.tag: _loss(m, f, r, tg).item() for r in m.grid}
    assert m.llm.base_model.active_adapters == ["a16v5"]  # the last one used
    with torch.no_grad():  # change only the a16v5 adapter
        for n, p in m.named_parameters():
            if ".lora_B.a16v5." in n:
                p.mul_(3.0)
    after = {r.tag: _loss(m, f, r, tg).item() for r in m.grid}
    for tag in ("a4v2", "a4v5", "a16v2"):
        assert after[tag] == pytest.approx(before[tag], abs=1e-6)
    assert after["a16v5"] != pytest.approx(before["a16v5"], abs=1e-4)


def test_mss_adds_the_shared_and_the_specific_delta(parts):
    m = _strategy_model(parts, "mss")
    layer = m.llm.base_model.model.model.layers[0].self_attn.q_proj  # a peft LoRA Linear
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        base = layer.base_layer(x)
        out = {}
        for names in (["ms"], ["a4v5"], ["ms", "a4v5"]):
            layer.set_adapter(names)
            out[tuple(names)] = layer(x)
    torch.testing.assert_close(out[("ms", "a4v5")] - base,
                               (out[("ms",)] - base) + (out[("a4v5",)] - base), rtol=1e-5, atol=1e-6)
    m.use_rates(Rates(4, 5))
    assert m.llm.base_model.active_adapters == ["ms", "a4v5"]
    assert all(p.requires_grad for p in m._trainable)  # switching adapters never freezes trained tensors


def test_the_loss_from_transcript_logits_only_equals_the_full_output_layers(parts):
    """The output layer runs only where the loss reads (the transcript and EOS): the summed losses and
    every trained tensor's gradient equal those of logits over the whole sequence."""
    m = _strategy_model(parts, "mss")
    m.train()
    tok = m.tokenizer
    tg = [tok("anna found the apple near the kitchen", add_special_tokens=False).input_ids,
          tok("please move", add_special_tokens=False).input_ids]

    def full_logits_ce(r):  # the loss as mavsr computed it before: every position's logits
        emb, mask, lab = m.build(_feats(), r, tg)
        logits = m.llm(inputs_embeds=emb, attention_mask=mask).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 lab[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")

    def grads(losses):
        m.zero_grad()
        torch.stack(losses).sum().backward()
        return torch.stack(losses).detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    torch.manual_seed(0)
    ce0, g0 = grads([full_logits_ce(r) for r in m.grid])
    torch.manual_seed(0)
    ce1, g1 = grads(m.ce_sums(_feats(), m.grid, tg))
    torch.testing.assert_close(ce1, ce0, rtol=1e-5, atol=1e-5)
    assert set(g1) == set(g0) and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_packing_is_refused_for_per_configuration_adapters(parts):
    m = _strategy_model(parts, "ss")
    with pytest.raises(ValueError, match="ms"):
        m.ce_sums(_feats(), m.grid, [[5], [6]], packed=True)
    with pytest.raises(MavsrError, match="pack_rates"):
        C.validate(C.from_dict({"model": {"lora": {"strategy": "ss"}}, "train": {"pack_rates": True}}))


def test_a_single_pair_model_holds_only_its_own_parts(parts):
    cfg = C.from_dict({"model": {"llm": str(parts / "llm"), "projector_hidden": 16,
                                 "lora": {"rank": 4, "alpha": 8, "strategy": "ss"}}})
    m = build_model(cfg, 32, 32, rates=[Rates(16, 5)])
    assert set(m.projectors) == {"a16", "v5"}
    assert {n.split(".lora_A.")[1].split(".")[0] for n, _ in m.named_parameters() if ".lora_A." in n} == {"a16v5"}


_FRESH = """
import sys, torch
from mavsr_cli import checkpoint, config as C
from mavsr_cli.model.build import build_model
from mavsr_cli.rates import Rates
sys.path.insert(0, sys.argv[3])
from test_models import _feats
ckpt, out = sys.argv[1], sys.argv[2]
meta = checkpoint.read_meta(__import__('pathlib').Path(ckpt))
cfg = C.from_dict(meta["config"])
m = build_model(cfg, 32, 32, seed=123, rates=[Rates.parse(t) for t in meta["rates"]])  # other seed: all from the file
m.load_trainable(checkpoint.load_state(__import__('pathlib').Path(ckpt)))
m.eval()
res = {}
with torch.inference_mode():
    for tag in meta["rates"]:
        r = Rates.parse(tag)
        m.use_rates(r)
        emb, mask, _ = m.build(_feats(), r, [[5, 6, 7], [8]])
        res[tag] = m.llm(inputs_embeds=emb, attention_mask=mask).logits.clone()
torch.save(res, out)
"""


@pytest.mark.parametrize("strategy", ["ms", "ss", "mss"])
def test_a_checkpoint_gives_identical_logits_in_a_fresh_process(parts, tmp_path, strategy):
    from mavsr_cli import checkpoint

    m = _strategy_model(parts, strategy)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad and "lora_B" not in n:
                p.add_(torch.randn_like(p) * 0.1)
    cfg_dict = {"model": {"llm": str(parts / "llm"), "projector_hidden": 16,
                          "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "strategy": strategy}}}
    tags = [r.tag for r in m.grid]
    ckpt = checkpoint.save(tmp_path / "ckpt", 1, m.trainable_state(), {"rates": tags, "config": cfg_dict}, None, keep=1)
    ref = {}
    with torch.inference_mode():
        for r in m.grid:
            m.use_rates(r)
            emb, mask, _ = m.build(_feats(), r, [[5, 6, 7], [8]])
            ref[r.tag] = m.llm(inputs_embeds=emb, attention_mask=mask).logits.clone()
    out = tmp_path / "logits.pt"
    res = subprocess.run([sys.executable, "-c", _FRESH, str(ckpt), str(out), str(Path(__file__).parent)],
                         capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(out)
    assert set(got) == set(ref) == set(tags)
    for t in tags:
        assert torch.equal(got[t], ref[t]), t
    if strategy != "ms":  # per-configuration adapters really differ, so the comparison can fail
        assert not torch.equal(ref[tags[0]], ref[tags[-1]])


def test_a_qwen2_style_llm_works_through_the_same_code(tmp_path):
    """Not only Llama: a Qwen2 causal LM (biased q/k/v) loads through AutoModelForCausalLM, trains, decodes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = llm_mod.word_tokenizer(synth.vocabulary() + "transcribe speech and video to text".split())
    v = tok.get_vocab()
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, bos_token_id=v["<s>"],
                                 eos_token_id=v["</s>"], pad_token_id=v["<pad>"])).save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    cfg = C.from_dict({"model": {"llm": str(tmp_path / "qwen"), "projector_hidden": 16, "projector_layernorm": True,
                                 "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "strategy": "mss"}}})
    m = build_model(cfg, 32, 32, seed=0)
    assert type(m.llm.base_model.model).__name__ == "Qwen2ForCausalLM"
    assert isinstance(m.projectors["a4"][-1], torch.nn.LayerNorm)
    tg = [tok("anna found the apple", add_special_tokens=False).input_ids, [8]]
    loss = _loss(m, _feats(), Rates(16, 5), tg)
    loss.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n or n.startswith("projectors.") or n == "markers" for n in grads)
    hyps, _ = generate(m.eval(), _feats(), Rates(4, 2), 4)
    assert len(hyps) == 2 and all(isinstance(h, str) for h in hyps)


def test_gradient_checkpointing_and_bf16_autocast_keep_the_loss(parts):
    from mavsr_cli.train_loop import MatryoshkaLoss

    tg = [[5, 6, 7], [8]]

    def run(ckpt=False, bf16=False):
        m = _strategy_model(parts, "ms").train()
        if ckpt:
            m.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            ce = MatryoshkaLoss(m, m.grid, packed=False)(_feats(), tg)
        ce.sum().backward()
        return ce.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ce0, g0 = run()
    ce1, g1 = run(ckpt=True)
    torch.testing.assert_close(ce1, ce0)
    assert set(g1) == set(g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
    ce2, g2 = run(bf16=True)
    assert torch.isfinite(ce2).all() and all(torch.isfinite(g).all() for g in g2.values())
    torch.testing.assert_close(ce2, ce0, rtol=3e-2, atol=0.0)  # bf16 matmuls: close, not equal


@pytest.mark.parametrize("beam", [1, 5])
def test_beam_search_is_batch_independent_and_repeatable(parts, beam):
    m = input_dependent(_strategy_model(parts, "ms"))
    g = torch.Generator().manual_seed(3)
    lens = [100, 60, 80, 40]
    f = {"audio": (torch.randn(4, 100, 32, generator=g), torch.tensor(lens)),
         "video": (torch.randn(4, 50, 32, generator=g), torch.tensor([n // 2 for n in lens]))}
    batched, n_in = generate(m, f, Rates(4, 2), 8, beam=beam)
    assert len(set(batched)) > 1  # the comparison below can fail
    single = [generate(m, {k: (x[i:i + 1, : (lens[i] if k == "audio" else lens[i] // 2)], n[i:i + 1])
                          for k, (x, n) in f.items()}, Rates(4, 2), 8, beam=beam)[0][0] for i in range(4)]
    assert batched == single
    assert generate(m, f, Rates(4, 2), 8, beam=beam)[0] == batched


def test_beam_search_of_width_one_is_greedy_search(parts):
    """mavsr's beam search (prefix run once, cache expanded and reordered) at width 1 must follow
    transformers' greedy search token for token: this checks the cache bookkeeping."""
    m = input_dependent(_strategy_model(parts, "ms"))
    g = torch.Generator().manual_seed(5)
    f = {"audio": (torch.randn(3, 100, 32, generator=g), torch.tensor([100, 70, 40])),
         "video": (torch.randn(3, 50, 32, generator=g), torch.tensor([50, 35, 20]))}
    emb, mask, _ = m.build(f, Rates(4, 2), None, left_pad=True)
    tok = m.tokenizer
    ref = m.llm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=1,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ref = [[t for t in row.tolist() if t not in (tok.eos_token_id, tok.pad_token_id)] for row in ref]
    got = beam_search(m.llm, emb, mask, tok.eos_token_id, 1, 10)
    assert got == ref and any(len(x) > 3 for x in got)
    assert greedy_search(m.llm, emb, mask, tok.eos_token_id, 10) == ref  # mavsr's greedy loop, the same tokens


def test_lm_warmup_examples_teach_reading_the_context(tmp_path):
    import numpy as np

    from mavsr_cli.datasets import synth
    from mavsr_cli.model import llm as llm_mod
    from mavsr_cli.stages.tiny_models import warmup_sequence

    words = synth.vocabulary()
    _, tok = llm_mod.load(str(llm_mod.tiny(tmp_path / "llm", words + ["transcribe", "text", "."], hidden=32, layers=1)))
    rng = np.random.default_rng(0)
    text = "anna found the red apple"
    kinds = {"plain": 0, "transcript": 0, "random": 0}
    prompt = "transcribe text ."
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    for _ in range(300):
        x, y = warmup_sequence(tok, text, prompt, rng, words)
        n_head = y.index(next(v for v in y if v != -100))
        target = y[n_head:-1]
        assert x[n_head:] == y[n_head:] and y[-1] == tok.eos_token_id  # the loss is on the target only
        assert x[n_head - len(p_ids):n_head] == p_ids
        context = x[1:n_head - len(p_ids)]
        if not context:
            kinds["plain"] += 1
            assert target == tok(text, add_special_tokens=False).input_ids
            continue
        kinds["transcript" if target == tok(text, add_special_tokens=False).input_ids else "random"] += 1
        # two stretched copies: every target word appears in the context (noise replaces 10%)
        hit = sum(t in context for t in target) / len(target)
        assert hit >= 0.5 and len(context) >= 2 * len(target)
    assert all(v > 60 for v in kinds.values()), kinds


def test_align_targets_give_the_word_under_each_frame(tmp_path):
    from mavsr_cli.errors import MavsrError
    from mavsr_cli.stages.tiny_models import ctc_targets, frame_targets

    words = ["apple", "red", "the"]
    timings = [("THE", 0.10, 0.20), ("RED", 0.20, 0.50), ("APPLE", 0.60, 1.00)]
    y50 = frame_targets(timings, 50, words)
    assert len(y50) == 50  # up to the last word's end
    assert y50[:5].tolist() == [0] * 5 and y50[5:10].tolist() == [3] * 5  # 'the' over 0.10-0.20 s
    assert y50[10:25].tolist() == [2] * 15 and y50[25:30].tolist() == [0] * 5 and y50[30:].tolist() == [1] * 20
    y25 = frame_targets(timings, 25, words)
    assert len(y25) == 25 and y25[15:].tolist() == [1] * 10  # the video rate halves every span
    with pytest.raises(MavsrError, match="framewise"):
        ctc_targets(["the red apple"], "align", words)


class _Saved:
    def __init__(self, t) -> None:
        self.t = t


class SavedBytes:
    """The bytes autograd holds for backward, and their peak: tensors saved by the graph, counted
    when saved and uncounted when the graph that holds them is freed."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def pack(self, t):
        import weakref

        n = t.numel() * t.element_size()
        self.now += n
        self.peak = max(self.peak, self.now)
        held = _Saved(t)
        weakref.finalize(held, self._free, n)
        return held

    def _free(self, n) -> None:
        self.now -= n

    @staticmethod
    def unpack(held):
        return held.t


@pytest.mark.parametrize("strategy", ["ms", "ss"])
def test_the_backward_per_configuration_gives_the_joint_gradient_and_holds_one_graph(parts, strategy, monkeypatch):
    """Issue 22, item 4: run configuration by configuration, a step's gradients are the joint
    backward's (fp32 tolerance; under MS the joint step's configurations share a merged pass), and
    the graph it holds at its peak is about one configuration's share of a joint step of separate
    passes."""
    from mavsr_cli.model import merged
    from mavsr_cli.train_loop import MatryoshkaLoss, matryoshka_backward

    tg = [[5, 6, 7, 9, 11], [8, 4]]
    out = {}
    for mode in ("joint", "per_config", "joint apart"):
        if mode == "joint apart":
            monkeypatch.setattr(merged, "mergeable", lambda decoder: False)
        m = _strategy_model(parts, strategy).train()
        engine, saved = MatryoshkaLoss(m, m.grid, packed=False), SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, SavedBytes.unpack):
            ce = matryoshka_backward(engine, _feats(), tg, len(m.grid), 0.25 / 7, mode == "per_config")
        out[mode] = ce, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, saved.peak
    (ce0, g0, _), (ce1, g1, peak1), (_, _, peak_apart) = out["joint"], out["per_config"], out["joint apart"]
    torch.testing.assert_close(ce1, ce0)
    assert ce0.shape == (len(_strategy_model(parts, strategy).grid),)
    assert set(g1) == set(g0) and len(g0) > 4
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    g = len(ce0)
    assert peak1 < peak_apart / g * 1.6, (peak_apart, peak1)  # (4 configurations: about a quarter of the joint peak)


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    """The tests' tiny LLM with two layers: merged.py runs every layer but the last its own way."""
    d = tmp_path_factory.mktemp("two_layers")
    llm_mod.tiny(d / "llm", synth.vocabulary() + "transcribe speech and video to text".split(), hidden=32,
                 layers=2, heads=2)
    return d


def _merged_and_apart(model_dir, monkeypatch, tg) -> dict:
    """A joint MS step's (losses, gradients, saved-for-backward peak): merged, then in separate passes."""
    from mavsr_cli.model import merged

    out = {}
    for mode in ("merged", "apart"):
        if mode == "apart":
            monkeypatch.setattr(merged, "mergeable", lambda decoder: False)
        m, saved = _strategy_model(model_dir, "ms").train(), SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, SavedBytes.unpack):
            ce = torch.stack(m.ce_sums(_feats(), m.grid, tg))
            ce.sum().backward()
        out[mode] = ce.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, saved.peak
    return out


def test_ms_configurations_run_merged_in_one_pass_with_the_separate_passes_sums(two_layers, monkeypatch):
    """Issue 21: under MS a joint step stacks its four configurations' rows into one LLM pass (the
    attention split back per configuration): the losses and gradients of separate passes, to fp32
    rounding, for no more bytes held for backward."""
    from mavsr_cli.model import merged

    calls = []
    real = merged.hidden_at_windows
    monkeypatch.setattr(merged, "hidden_at_windows", lambda *a: calls.append(len(a[1])) or real(*a))
    out = _merged_and_apart(two_layers, monkeypatch, [[5, 6, 7, 9, 11], [8, 4]])
    (ce0, g0, peak0), (ce1, g1, peak1) = out["merged"], out["apart"]
    assert calls == [4]  # one merged pass of the 4 configurations; none once merging is off
    torch.testing.assert_close(ce0, ce1, rtol=1e-6, atol=1e-6)
    assert set(g0) == set(g1) and len(g0) > 10
    for n in g0:
        assert g0[n].abs().max() > 0, n
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7, msg=n)
    assert peak0 <= peak1, (peak0, peak1)


def test_an_llm_whose_layers_are_hooked_or_checkpointed_runs_its_configurations_apart(two_layers):
    """FSDP gathers a layer's shards in a hook on the layer's call, and gradient checkpointing
    wraps that call: the merged pass, which calls a layer's parts, runs neither, so it steps aside."""
    from mavsr_cli.model import merged

    m = _strategy_model(two_layers, "ms").train()
    decoder = m.llm.get_base_model().get_decoder()
    assert merged.mergeable(decoder)
    seen = []
    hook = decoder.layers[0].register_forward_pre_hook(lambda module, args: seen.append(module))
    assert not merged.mergeable(decoder)
    m.ce_sums(_feats(), m.grid, [[5, 6], [7]])
    assert len(seen) == len(m.grid)  # every configuration's pass called the hooked layer
    hook.remove()
    assert merged.mergeable(decoder)
    for hooked in (decoder.layers[-1].self_attn.register_forward_hook(lambda *a: None),  # the merged pass skips it
                   decoder.layers[0].mlp.register_forward_hook(lambda *a: None),  # it would see (rows, D)
                   torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)):
        assert not merged.mergeable(decoder)
        hooked.remove()
    assert merged.mergeable(decoder)
    m.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not merged.mergeable(decoder)


def test_a_steps_gradients_are_the_same_in_every_run_on_several_threads(parts):
    """The markers feed every row of a batch; their gradient sums many rows and must do so in a
    fixed order (an index gather's backward added them with CPU atomics: 1e-7 apart run to run)."""
    from mavsr_cli.train_loop import MatryoshkaLoss

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        tg = [[5 + i % 9, 6, 7 + i % 5, 9] for i in range(32)]
        g = torch.Generator().manual_seed(0)
        feats = {"audio": (torch.randn(32, 200, 32, generator=g), torch.arange(200, 40, -5)),
                 "video": (torch.randn(32, 100, 32, generator=g), torch.arange(100, 20, -2.5).long())}
        runs = []
        for _ in range(6):
            m = _strategy_model(parts, "ms").train()
            MatryoshkaLoss(m, m.grid, packed=False)(feats, tg).sum().backward()
            runs.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for n in runs[0]:
            assert torch.equal(other[n], runs[0][n]), n


def test_a_bf16_frozen_llm_trains_fp32_tensors_and_decodes(parts):
    """Issue 22, item 3: model.frozen_dtype bfloat16 loads the frozen LLM in bf16 (half its bytes),
    keeps every trained tensor in float32, trains under bf16 autocast and decodes under it, close
    to the float32 model; auto stays float32 where the matmuls are float32 (CPU)."""
    from mavsr_cli.model.build import frozen_dtype, train_bf16
    from mavsr_cli.train_loop import MatryoshkaLoss, optimizer

    def model(dtype):
        cfg = C.from_dict({"model": {"llm": str(parts / "llm"), "projector_hidden": 16, "frozen_dtype": dtype,
                                     "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}}})
        return build_model(cfg, 32, 32, seed=0, bf16=train_bf16(cfg.train, "cpu")), cfg

    m32, _ = model("auto")
    m16, cfg = model("bfloat16")
    assert m32.frozen_dtype == torch.float32 and m16.frozen_dtype == torch.bfloat16
    assert frozen_dtype("auto", True) == torch.bfloat16 and frozen_dtype("auto", False) == torch.float32
    frozen = {n: p for n, p in m16.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in m16.named_parameters() if p.requires_grad}
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    bytes_of = lambda m: sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)  # noqa: E731
    assert bytes_of(m16) * 2 == bytes_of(m32)
    tg = [[5, 6, 7], [8]]
    opt = optimizer([p for p in m16.parameters() if p.requires_grad], cfg.train)
    before = {n: p.detach().clone() for n, p in trained.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce = MatryoshkaLoss(m16.train(), m16.grid, packed=False)(_feats(), tg)
    ce.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained.values())
    opt.step()
    assert all(p.dtype == torch.float32 for p in trained.values())
    assert any(not torch.equal(p, before[n]) for n, p in trained.items())
    with torch.no_grad():  # the same trained tensors in both: decoding differs only by the frozen weights' dtype
        m32.load_trainable(m16.trainable_state())
    for beam in (1, 3):
        hyps16, n16 = generate(m16.eval(), _feats(), Rates(4, 2), 4, beam=beam)
        hyps32, n32 = generate(m32.eval(), _feats(), Rates(4, 2), 4, beam=beam)
        assert n16 == n32 and len(hyps16) == 2 and all(isinstance(h, str) for h in hyps16)
    # the bf16 LLM's inputs, and so its residual stream and the keys and values it caches, are bf16 as
    # its own embedding would give them (float32 markers and projections had promoted the keys)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert m16.build(_feats(), Rates(4, 2), None, left_pad=True)[0].dtype == torch.bfloat16
        assert m32.build(_feats(), Rates(4, 2), None, left_pad=True)[0].dtype == torch.float32
    cached = []
    real = kv_cache.in_place_cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kv_cache, "in_place_cache", lambda extra: cached.append(real(extra)) or cached[-1])
        generate(m16, _feats(), Rates(4, 2), 4, beam=3)
    assert cached and {x.dtype for layer in cached[0].layers for x in layer.buf + layer.gen} == {torch.bfloat16}
    # the prompt's last row reaches the output layer whole (a strided bf16 row made PyTorch's CPU product
    # copy the layer's weight once per row: 2 GB at Llama-3.2-1B's vocabulary, benchmarks/README.md)
    seen = []
    hook = llm_mod.causal_lm(m16.llm).lm_head.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous()))
    try:
        generate(m16, _feats(), Rates(4, 2), 4, beam=3)
    finally:
        hook.remove()
    assert seen and all(seen), seen
    l16 = MatryoshkaLoss(m16, m16.grid, packed=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        c16 = l16(_feats(), tg)
    with torch.no_grad():
        c32 = MatryoshkaLoss(m32, m32.grid, packed=False)(_feats(), tg)
    torch.testing.assert_close(c16.float(), c32, rtol=3e-2, atol=0.0)


def test_bf16_frozen_weights_with_fp32_matmuls_are_refused():
    with pytest.raises(MavsrError, match="frozen_dtype bfloat16 needs bf16 matmuls"):
        C.validate(C.from_dict({"model": {"frozen_dtype": "bfloat16"}, "train": {"precision": "fp32"}}))
    with pytest.raises(MavsrError, match="frozen_dtype must be auto, float32 or bfloat16"):
        C.validate(C.from_dict({"model": {"frozen_dtype": "fp16"}}))
