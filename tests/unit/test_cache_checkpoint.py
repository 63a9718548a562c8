import json

import pytest
import torch
from safetensors.torch import save_file

from mavsr_cli import checkpoint, features
from mavsr_cli import config as C
from mavsr_cli.errors import MavsrError
from mavsr_cli.features import FeatureStore, model_digest, pad_batch
from mavsr_cli.recipe import Recipe, mark_done
from mavsr_cli.stages import extract_features, train


def test_pad_batch():
    x, n = pad_batch([torch.ones(3, 2), torch.ones(1, 2)])
    assert x.shape == (2, 3, 2) and n.tolist() == [3, 1] and x[1, 1:].abs().sum() == 0


def test_feature_store_reads_a_finished_cache_only(tmp_path):
    with pytest.raises(MavsrError, match="extract-features"):
        FeatureStore(tmp_path)
    save_file({"u1/audio": torch.randn(4, 3).half(), "u1/video": torch.randn(2, 3).half()},
              tmp_path / "shard-00000.safetensors")
    (tmp_path / "index.jsonl").write_text(json.dumps({"id": "u1", "shard": "shard-00000.safetensors"}) + "\n")
    (tmp_path / "provenance.json").write_text("{}")
    mark_done(tmp_path)
    s = FeatureStore(tmp_path)
    assert s.ids() == ["u1"] and s.get("u1", "audio").dtype == torch.float32 and s.get("u1", "video").shape == (2, 3)


def test_model_digest_changes_with_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    a = model_digest(str(tmp_path))
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    assert model_digest(str(tmp_path)) != a
    assert model_digest("org/some-hub-id") == model_digest("org/some-hub-id")


def test_a_cache_of_other_encoders_is_refused(tmp_path):
    r = Recipe(tmp_path)
    (tmp_path / "models" / "whisper").mkdir(parents=True)
    (tmp_path / "models" / "video").mkdir(parents=True)
    cfg = C.from_dict({"audio_encoder": {"path": "models/whisper"}, "video_encoder": {"path": "models/video"}})
    prov = features.provenance(r, cfg)
    out = r.dump(features.encoders_tag(prov), "train")
    out.mkdir(parents=True)
    (out / "provenance.json").write_text(json.dumps({"encoders": {**prov, "audio": {"path": "other"}}}))
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "manifest.jsonl").write_text("")
    with pytest.raises(MavsrError, match="other encoders"):
        extract_features.run(r, cfg, ["train"], log=lambda m: None)


def test_checkpoints_keep_the_last_k_and_describe_themselves(tmp_path):
    state = {"projectors.a4.0.weight": torch.randn(2, 2)}
    for step in (10, 20, 30):
        checkpoint.save(tmp_path / "ckpt", step, state, {"rates": ["a4v2"], "step": step}, {"epoch": 0}, keep=2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path / "ckpt")]
    assert names == ["step-000020", "step-000030"]
    latest = checkpoint.latest(tmp_path)
    assert checkpoint.read_meta(latest) == {"rates": ["a4v2"], "step": 30}
    assert torch.equal(checkpoint.load_state(latest)["projectors.a4.0.weight"], state["projectors.a4.0.weight"])
    assert json.loads((latest / "checksums.json").read_text()).keys() == {"model.safetensors", "trainer.pt"}
    (latest / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(MavsrError, match="is corrupt: its checksum does not match"):
        checkpoint.read_meta(latest)
    (latest / "checksums.json").unlink()  # a checkpoint from before checksums: only its readability is checked
    with pytest.raises(MavsrError, match="unreadable checkpoint"):
        checkpoint.read_meta(latest)
    with pytest.raises(MavsrError, match="no checkpoint"):
        checkpoint.latest(tmp_path / "elsewhere")


def test_an_experiment_started_with_another_config_is_not_mixed(tmp_path):
    r = Recipe(tmp_path)
    exp = r.exp("x")
    exp.mkdir(parents=True)
    (exp / "config.yaml").write_text(C.from_dict({"train": {"lr": 0.5}}).dump())
    with pytest.raises(MavsrError, match="another config"):
        train.run(r, C.Config(), "all", "x", log=lambda m: None)
    with pytest.raises(MavsrError, match="not in the trained grid"):
        train.run(r, C.Config(), "a8v2", "y", log=lambda m: None)
