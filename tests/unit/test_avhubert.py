"""AV-HuBERT: fairseq checkpoints read without fairseq, through a restricted unpickler."""

import argparse
import os
import pickle
import sys
import types

import pytest
import torch

from mavsr_cli.errors import MavsrError
from mavsr_cli.model.avhubert import AVHubertConfig, AVHubertVideoEncoder
from mavsr_cli.model.video_encoder import load_video_encoder
from mavsr_cli.safe_pickle import load_checkpoint

TINY = dict(encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4,
            conv_pos=16, conv_pos_groups=4, resnet_channels=8)


def test_large_has_the_released_files_tensors():
    with torch.device("meta"):
        m = AVHubertVideoEncoder(AVHubertConfig())
    state = m.state_dict()
    assert len(state) == 532  # formats.md: 538 in the file, 532 needed for video features
    assert state["encoder.pos_conv.0.weight_g"].shape == (1, 1, 128)
    assert state["encoder.pos_conv.0.weight_v"].shape == (1024, 64, 128)
    assert state["feature_extractor_video.resnet.frontend3D.0.weight"].shape == (64, 1, 5, 7, 7)
    assert "feature_extractor_video.resnet.trunk.layer2.0.downsample.0.weight" in state
    assert "feature_extractor_video.resnet.trunk.layer2.1.downsample.0.weight" not in state
    assert "feature_extractor_video.resnet.trunk.layer1.0.relu1.weight" in state
    assert len(m.fairseq_state()) == 538


class _FakeFairseq:
    """Make `fairseq.data.dictionary.Dictionary` picklable while writing, then vanish."""

    def __enter__(self):
        mods = {n: types.ModuleType(n) for n in ("fairseq", "fairseq.data", "fairseq.data.dictionary")}

        class Dictionary:
            def __init__(self):
                self.symbols = ["<s>", "<pad>", "</s>", "<unk>"]
                self.count = [1, 1, 1, 1]

        Dictionary.__module__ = "fairseq.data.dictionary"
        Dictionary.__qualname__ = "Dictionary"
        mods["fairseq.data.dictionary"].Dictionary = Dictionary
        self.saved = {n: sys.modules.get(n) for n in mods}
        sys.modules.update(mods)
        return Dictionary

    def __exit__(self, *exc):
        for n, m in self.saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def write_checkpoint(path, model, old_style=False, layer_norm_first=True):
    with _FakeFairseq() as Dictionary:
        ckpt = {"model": model.fairseq_state(), "task_state": {"dictionaries": [Dictionary()]}}
        if old_style:
            ckpt["args"] = argparse.Namespace(**TINY, _name="av_hubert", layer_norm_first=layer_norm_first)
        else:
            ckpt["cfg"] = {"model": {**TINY, "_name": "av_hubert", "modality_fuse": "concat",
                                     "layer_norm_first": layer_norm_first}, "task": {"labels": ["km"]}}
        torch.save(ckpt, path)
    assert "fairseq" not in sys.modules


@pytest.mark.parametrize("old_style", [False, True])
def test_tiny_checkpoint_round_trip_without_fairseq(tmp_path, old_style):
    torch.manual_seed(0)
    m = AVHubertVideoEncoder(AVHubertConfig(**TINY)).eval()
    path = tmp_path / "avhubert_tiny.pt"
    write_checkpoint(path, m, old_style)
    with pytest.raises(pickle.UnpicklingError):  # what a plain weights-only load does with such a file
        torch.load(path, weights_only=True)
    loaded = load_video_encoder(str(path))
    assert isinstance(loaded, AVHubertVideoEncoder) and loaded.cfg == AVHubertConfig(**TINY)
    x = torch.randn(12, 88, 88)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    assert loaded(x).shape == (12, 32)


def _torch_post_ln_layer(layer):
    """torch's own post-LN transformer layer holding the weights of one AV-HuBERT layer."""
    a = layer.self_attn
    d = a.q_proj.weight.shape[0]
    ref = torch.nn.TransformerEncoderLayer(d, a.heads, layer.fc1.weight.shape[0], dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=False).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        ref.self_attn.out_proj.load_state_dict(a.out_proj.state_dict())
        for name in ("fc1", "fc2"):
            getattr(ref, {"fc1": "linear1", "fc2": "linear2"}[name]).load_state_dict(getattr(layer, name).state_dict())
        ref.norm1.load_state_dict(layer.self_attn_layer_norm.state_dict())
        ref.norm2.load_state_dict(layer.final_layer_norm.state_dict())
    return ref


@pytest.mark.parametrize("old_style", [False, True])
def test_a_post_ln_checkpoint_is_read_as_post_ln(tmp_path, old_style):
    """layer_norm_first comes from the checkpoint's own config: a post-LN one (False) computes the
    norm before the layers and after each residual sum, as torch's post-LN layer does."""
    torch.manual_seed(0)
    m = AVHubertVideoEncoder(AVHubertConfig(**TINY)).eval()
    for p in m.parameters():  # norms away from identity, so the order of operations shows
        p.data.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "post_ln.pt"
    write_checkpoint(path, m, old_style, layer_norm_first=False)
    post = load_video_encoder(str(path))
    assert post.cfg.layer_norm_first is False
    x = torch.randn(10, 88, 88)
    with torch.no_grad():
        h = torch.randn(1, 10, 32)
        want = post.encoder.layer_norm(h + post.encoder.pos_conv(h.transpose(1, 2)).transpose(1, 2))
        for layer in post.encoder.layers:
            want = _torch_post_ln_layer(layer)(want)
        torch.testing.assert_close(post.encoder(h), want, atol=1e-5, rtol=1e-5)
        assert (post(x) - m(x)).abs().max() > 1e-2  # the same tensors, read as pre-LN, compute another thing


def test_wrong_or_missing_tensors_are_named(tmp_path):
    m = AVHubertVideoEncoder(AVHubertConfig(**TINY))
    path = tmp_path / "bad.pt"
    state = m.fairseq_state()
    del state["encoder.layers.1.fc1.weight"]
    state["encoder.layers.9.fc1.weight"] = torch.zeros(1)
    torch.save({"model": state, "cfg": {"model": TINY}}, path)
    with pytest.raises(MavsrError, match=r"missing 1 tensors \['encoder.layers.1.fc1.weight'\].*encoder.layers.9"):
        AVHubertVideoEncoder.load(path)
    wide = m.fairseq_state()  # a checkpoint whose tensors disagree with its own config
    wide["encoder.layers.0.fc1.weight"] = torch.zeros(65, 32)
    torch.save({"model": wide, "cfg": {"model": TINY}}, path)
    with pytest.raises(MavsrError, match=r"does not match its own config .*encoder\.layers\.0\.fc1\.weight is "
                                         r"\(65, 32\), the config makes it \(64, 32\)"):
        AVHubertVideoEncoder.load(path)
    torch.save({"cfg": {"model": TINY}}, path)
    with pytest.raises(MavsrError, match="no 'model'"):
        AVHubertVideoEncoder.load(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(MavsrError, match="not a readable torch checkpoint"):
        AVHubertVideoEncoder.load(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_crafted_pickle_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "cfg": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MavsrError, match="refused to load global (posix|os|nt).system"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned.txt").exists()
