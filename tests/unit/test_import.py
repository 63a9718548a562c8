"""`mavsr import`: checkpoints in the authors' layout become experiments that compute their forward.

The reference forward and layout are tests/authors_reference.py's (what it reproduces, and from
where, is written there). Each case saves a tiny model of theirs as their scripts save it, imports
it through the code a user runs, and compares mavsr's logits and greedy transcripts with theirs.
"""

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mavsr_cli import authors
from mavsr_cli.decoding import Decoder, generate
from mavsr_cli.errors import MavsrError
from mavsr_cli.features import pad_batch
from mavsr_cli.media import fit_audio
from mavsr_cli.model import llm as llm_mod
from mavsr_cli.model.audio_encoder import WhisperAudioEncoder
from mavsr_cli.model.avhubert import AVHubertConfig, AVHubertVideoEncoder
from mavsr_cli.model.video_encoder import load_video_encoder
from mavsr_cli.recipe import Recipe
from mavsr_cli.stages import imports

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from authors_reference import ADDED, AuthorsAVSR  # noqa: E402

AVH = dict(encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
           conv_pos=16, conv_pos_groups=4, resnet_channels=8)
WORDS = "the cat sat on a mat and dog ran to see it transcribe speech video text".split()
SRC = imports.Sources("models/llm", "models/whisper", "models/avhubert.pt")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A recipe dir with the tiny models the authors' checkpoint was 'trained' from."""
    d = tmp_path_factory.mktemp("import")
    WhisperAudioEncoder.tiny(d / "models/whisper", d_model=32, layers=1, heads=2)
    llm_mod.tiny(d / "models/llm", WORDS, hidden=64, layers=2, heads=4)
    torch.manual_seed(0)
    avh = AVHubertVideoEncoder(AVHubertConfig(**AVH))
    torch.save({"model": avh.fairseq_state(), "cfg": {"model": dict(AVH, _name="av_hubert")}},
               d / "models/avhubert.pt")
    return d


def reference(root: Path, **kw) -> AuthorsAVSR:
    """Their model over fresh copies of the tiny parts (their LoRA, projectors and markers random)."""
    from transformers import AutoFeatureExtractor, WhisperModel

    llm, tok = llm_mod.load(str(root / "models/llm"))
    whisper = WhisperModel.from_pretrained(root / "models/whisper").encoder.eval()
    extractor = AutoFeatureExtractor.from_pretrained(root / "models/whisper")
    video = AVHubertVideoEncoder.load(root / "models/avhubert.pt") if kw.get("video_rates") else None
    return AuthorsAVSR(llm, tok, whisper, extractor, video, **kw).eval()


def media(seconds: float = 1.3):
    rng = np.random.default_rng(3)
    wav = (np.sin(np.arange(int(16000 * seconds)) * 0.05) * 0.1 + rng.normal(0, 0.02, int(16000 * seconds)))
    return wav.astype(np.float32), torch.randn(int(25 * seconds), 88, 88, generator=torch.Generator().manual_seed(4))


def mavsr_features(root: Path, exp: Path, wav, frames) -> dict:
    dec = Decoder(Recipe(root), exp, None)
    feats = {}
    with torch.no_grad():
        if "a" in dec.cfg.model.modality:
            enc = WhisperAudioEncoder.from_config(str(root / dec.cfg.audio_encoder.path), dec.cfg.audio_encoder)
            if dec.cfg.audio_encoder.fit_video and "v" in dec.cfg.model.modality:
                wav = fit_audio(wav, len(frames))
            feats["audio"] = pad_batch([enc(wav)])
        if "v" in dec.cfg.model.modality:
            feats["video"] = pad_batch([load_video_encoder(root / dec.cfg.video_encoder.path)(frames)])
    return dec, feats


CASES = {  # flavour, the reference's settings, what the command line says of a .pth
    "mtsk-av": ("omni-avsr", dict(audio_rates=[4, 16], video_rates=[2, 5]),
                authors.Hints(audio_rates=(4, 16), video_rates=(2, 5))),
    "mtsk-a": ("omni-avsr", dict(audio_rates=[4, 16], video_rates=[], avhubert_lora=False, alpha=2.0),
               authors.Hints(audio_rates=(4, 16), lora_scale=0.5)),  # their --alpha 2 --rank 4
    "lavsr-stack": ("llama-avsr", dict(audio_rates=[3], video_rates=[2], matryoshka=False, layernorm=False,
                                       compression="stack", reduction=8, alpha=1.0, added=ADDED[1:]),
                    authors.Hints()),  # stacking: the rates read off the input widths; a tokenizer with a pad
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_imported_checkpoint_computes_the_authors_forward(root, tmp_path, case):
    """Logits over the original vocabulary within 1e-4 of theirs at every rate pair, and the same
    greedy transcript, from the media on: their Whisper input normalisation, pooling, projectors,
    LoRA, markers, and their AV-HuBERT's own BatchNorm statistics and LoRA."""
    flavour, kw, hints = CASES[case]
    ref = reference(root, **kw)
    torch.save(ref.checkpoint_state(), tmp_path / "model_avg_1.pth")
    exp = imports.run(Recipe(root), flavour, tmp_path / "model_avg_1.pth", Path(f"exp/{case}"), SRC, hints,
                      log=lambda m: None)
    wav, frames = media()
    dec, feats = mavsr_features(root, exp, wav, frames)
    model, vocab = dec.model, ref.base_vocab
    a_ref = ref.audio_features(wav, len(frames) if kw["video_rates"] else None) if kw["audio_rates"] else None
    for rates in dec.trained:
        with torch.no_grad():
            emb_ref = ref.embeddings(a_ref, frames if kw["video_rates"] else None, (rates.audio, rates.video),
                                     dec.cfg.model.resolved_prompt())
            want = ref.llm(inputs_embeds=emb_ref).logits[0, :, :vocab]
            emb, mask, _ = model.build(feats, rates)
            got = model.llm(inputs_embeds=emb, attention_mask=mask).logits[0]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        ids = ref.greedy(emb_ref, 10)
        assert ids and all(i < vocab for i in ids)  # their argmax never fell on an added row here
        text, _ = generate(model, feats, rates, 10, beam=1)
        assert text[0] == " ".join(model.tokenizer.decode(ids, skip_special_tokens=True).split())


def test_the_config_says_what_the_authors_code_did(root, tmp_path):
    ref = reference(root, **CASES["mtsk-av"][1])
    torch.save(ref.checkpoint_state(torch.bfloat16), tmp_path / "model_avg_1.pth")  # as their bf16-true runs save
    exp = imports.run(Recipe(root), "omni-avsr", tmp_path / "model_avg_1.pth", Path("exp/cfg"), SRC,
                      CASES["mtsk-av"][2], log=lambda m: None)
    dec = Decoder(Recipe(root), exp, None)
    m = dec.cfg.model
    assert [r.tag for r in dec.trained] == ["a4v2", "a4v5", "a16v2", "a16v5"]
    assert (m.compression, m.projector_layernorm, m.projector_hidden) == ("avg", True, 48)
    assert (m.lora.strategy, m.lora.rank, m.lora.alpha / m.lora.rank, m.lora.dropout) == ("ms", 16, 0.125, 0.0)
    assert dec.cfg.audio_encoder.normalize and dec.cfg.audio_encoder.mode == "faithful"
    assert (dec.cfg.decode.beam, dec.cfg.decode.max_new_tokens) == (15, 32)
    assert dec.meta["imported_from"]["flavour"] == "omni-avsr"
    state = ref.checkpoint_state(torch.bfloat16)
    markers = dec.model.markers.detach()
    torch.testing.assert_close(markers, state["llm.model.embed_tokens.weight"][-4:].float(), atol=0, rtol=0)


class _FakeLightning:
    """Lightning's AttributeDict, importable while a checkpoint is written, then gone."""

    def __enter__(self):
        mod = types.ModuleType("lightning.fabric.utilities.data")

        class AttributeDict(dict):
            pass

        AttributeDict.__module__, AttributeDict.__qualname__ = mod.__name__, "AttributeDict"
        mod.AttributeDict = AttributeDict
        self.names = ["lightning", "lightning.fabric", "lightning.fabric.utilities", mod.__name__]
        for n in self.names[:-1]:
            sys.modules[n] = types.ModuleType(n)
        sys.modules[mod.__name__] = mod
        return AttributeDict

    def __exit__(self, *exc):
        for n in self.names:
            sys.modules.pop(n, None)


def test_a_lightning_checkpoint_brings_its_own_options(root, tmp_path):
    """epoch=K.ckpt: the tensors under state_dict["model.*"], rates, pooling, LoRA scale and prompt
    from hyper_parameters, so no option is needed; the Lightning classes are never imported."""
    ref = reference(root, audio_rates=[4, 16], video_rates=[], avhubert_lora=False, reduction=4, alpha=1.0)
    with _FakeLightning() as AttributeDict:
        hp = AttributeDict(downsample_ratio_audio=[4, 16], compression_mode="avg-pooling", rank=4, alpha=1.0,
                           prompt_audio="Please transcribe speech.", max_dec_tokens=24, num_beams=15)
        torch.save({"epoch": 7, "global_step": 800, "state_dict": {f"model.{k}": v for k, v in
                                                                  ref.checkpoint_state().items()},
                    "hyper_parameters": hp, "optimizer_states": [{"state": {}}]}, tmp_path / "epoch=7.ckpt")
    assert "lightning" not in sys.modules
    src = imports.Sources("models/llm", "models/whisper", None)
    exp = imports.run(Recipe(root), "omni-avsr", tmp_path / "epoch=7.ckpt", Path("exp/lightning"), src,
                      authors.Hints(), log=lambda m: None)
    dec = Decoder(Recipe(root), exp, None)
    assert [r.tag for r in dec.trained] == ["a4", "a16"] and dec.cfg.model.lora.alpha / dec.cfg.model.lora.rank == 0.25
    assert dec.cfg.model.resolved_prompt() == "Please transcribe speech." and dec.cfg.decode.max_new_tokens == 24


def _refused(root, tmp_path, state_or_file, match, src=SRC, hints=CASES["mtsk-av"][2], name="bad"):
    path = tmp_path / "ckpt.pth"
    if isinstance(state_or_file, Path):
        path = state_or_file
    else:
        torch.save(state_or_file, path)
    with pytest.raises(MavsrError, match=match):
        imports.run(Recipe(root), "omni-avsr", path, Path(f"exp/{name}"), src, hints, log=lambda m: None)
    assert not (root / "exp" / name).exists()  # nothing written


def test_foreign_or_unmappable_checkpoints_are_refused_in_one_line(root, tmp_path):
    good = reference(root, **CASES["mtsk-av"][1]).checkpoint_state()
    _refused(root, tmp_path, {"weights": torch.zeros(2)}, "not a checkpoint of the authors' code: it has no audio_proj")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    _refused(root, tmp_path, tmp_path / "junk.pth", "not a readable torch checkpoint")
    _refused(root, tmp_path, tmp_path, "not a checkpoint of the authors' code .* a mavsr experiment needs no import")
    task = dict(good)
    task["llm.model.layers.0.self_attn.lora_down_Q.audio.weight"] = task.pop(
        "llm.model.layers.0.self_attn.lora_down_Q.weight")
    _refused(root, tmp_path, task, r"cannot map llm\.model\.layers\.0\.self_attn\.lora_down_Q\.audio\.weight")
    _refused(root, tmp_path, {**good, "sink.weight": torch.zeros(1)}, "cannot map sink.weight")
    _refused(root, tmp_path, good, "give --audio-rates", hints=authors.Hints(video_rates=(2, 5)))
    _refused(root, tmp_path, good, "2 audio projector.* 3 rates", hints=authors.Hints((4, 8, 16), (2, 5)))
    other = dict(good)
    key = "llm.model.layers.1.mlp.down_proj.weight"
    other[key] = torch.randn_like(other[key])
    _refused(root, tmp_path, other, r"llm\.model\.layers\.1\.mlp\.down_proj\.weight differs from --llm models/llm")
    _refused(root, tmp_path, {k: v for k, v in good.items() if k != "llm.model.layers.1.self_attn.lora_up_V.weight"},
             r"the checkpoint has no llm\.model\.layers\.1\.self_attn\.lora_up_V\.weight")
    _refused(root, tmp_path, {k: v for k, v in good.items() if "video_encoder.encoder.layers.0.self_attn.lora_up_Q"
                              not in k}, r"has video_encoder.*lora_down_Q.weight but no .*lora_up_Q\.weight")
    whisper = dict(good)
    whisper["audio_encoder.conv1.weight"] = whisper["audio_encoder.conv1.weight"] * 2
    _refused(root, tmp_path, whisper, "audio_encoder.conv1.weight differs from --audio-encoder")
    no_avh = {k: v for k, v in good.items() if not k.startswith("video_encoder.")}
    _refused(root, tmp_path, no_avh, "video projectors but no AV-HuBERT",
             src=imports.Sources(SRC.llm, SRC.audio_encoder, None))
    short = {k: v for k, v in good.items() if k != "video_encoder.encoder.layers.1.fc2.weight"}
    _refused(root, tmp_path, short, r"AV-HuBERT does not match its config .*video_encoder\.encoder\.layers\.1\.fc2")


def test_the_command_line_refuses_in_one_line(root, tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pth")
    r = subprocess.run([sys.executable, "-m", "mavsr_cli", "import", "omni-avsr", str(tmp_path / "x.pth"), "--exp",
                        "exp/cli", "--llm", "models/llm", "--dir", str(root)], capture_output=True, text=True)
    assert r.returncode != 0 and not (root / "exp/cli").exists()
    assert r.stderr.strip().count("\n") == 0 and "not a checkpoint of the authors' code" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mavsr_cli", "import", "espnet", "x.pth", "--exp", "e", "--llm", "l",
                        "--dir", str(root)], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown checkpoint flavour 'espnet' (available: omni-avsr, llama-avsr)" in r.stderr


def test_force_replaces_an_experiment_whole_and_nothing_else(root, tmp_path):
    ref = reference(root, **CASES["mtsk-a"][1])
    torch.save(ref.checkpoint_state(), tmp_path / "model_avg_1.pth")
    hints = CASES["mtsk-a"][2]
    src = imports.Sources("models/llm", "models/whisper", None)
    exp = imports.run(Recipe(root), "omni-avsr", tmp_path / "model_avg_1.pth", Path("exp/forced"), src, hints,
                      log=lambda m: None)
    before = (exp / "meta.json").read_text()
    with pytest.raises(MavsrError, match="exists; use --force"):
        imports.run(Recipe(root), "omni-avsr", tmp_path / "model_avg_1.pth", Path("exp/forced"), src, hints)
    for target in (Path("."), Path("models")):  # never a dir that is not an experiment
        with pytest.raises(MavsrError, match="not an experiment dir"):
            imports.run(Recipe(root), "omni-avsr", tmp_path / "model_avg_1.pth", target, src, hints, force=True)
    assert (root / "models/llm").is_dir()
    bad = ref.checkpoint_state()
    bad["audio_encoder.conv1.weight"] = bad["audio_encoder.conv1.weight"] * 2
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(MavsrError, match="differs from --audio-encoder"):
        imports.run(Recipe(root), "omni-avsr", tmp_path / "bad.pth", Path("exp/forced"), src, hints, force=True)
    assert (exp / "meta.json").read_text() == before  # a refused --force leaves the old experiment as it was
    imports.run(Recipe(root), "omni-avsr", tmp_path / "model_avg_1.pth", Path("exp/forced"), src, hints,
                force=True, log=lambda m: None)
    assert not list(exp.parent.glob(".forced.tmp-*"))


def test_audio_is_fitted_to_the_video_as_the_authors_av_data_are():
    wav = np.arange(1000, dtype=np.float32)
    assert np.array_equal(fit_audio(wav, 1), wav[:640])
    padded = fit_audio(wav, 2)
    assert len(padded) == 1280 and np.array_equal(padded[:1000], wav) and not padded[1000:].any()
