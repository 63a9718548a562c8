from pathlib import Path

import pytest

from mavsr_cli import config as C
from mavsr_cli.errors import MavsrError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_paper():
    cfg = C.Config()
    assert [r.tag for r in cfg.model.rate_grid()] == ["a4v2", "a4v5", "a16v2", "a16v5"]
    assert cfg.train.betas == (0.9, 0.98) and cfg.train.weight_decay == 0.1 and cfg.train.grad_clip == 10
    assert cfg.model.lora.targets == ("q_proj", "v_proj")
    assert cfg.model.resolved_prompt() == "Transcribe speech and video to text."


def test_modality_picks_the_grid_and_prompt():
    cfg = C.from_dict({"model": {"modality": "a", "audio_rates": [2, 4]}})
    assert [r.tag for r in cfg.model.rate_grid()] == ["a2", "a4"]
    assert cfg.model.resolved_prompt() == "Transcribe speech to text."


def test_yaml_round_trip(tmp_path):
    cfg = C.from_dict({"train": {"lr": 5e-4}, "model": {"video_rates": [1, 3]}})
    p = tmp_path / "c.yaml"
    p.write_text(cfg.dump())
    assert C.load(p) == cfg


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(MavsrError, match="train.learning_rate"):
        C.load(p)
    p.write_text("model:\n  audio_rate: [4]\n")
    with pytest.raises(MavsrError, match="did you mean 'audio_rates'"):
        C.load(p)


def test_bad_values_and_files(tmp_path):
    with pytest.raises(MavsrError, match="not found"):
        C.load(tmp_path / "missing.yaml")
    p = tmp_path / "c.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(MavsrError, match="not valid YAML"):
        C.load(p)
    p.write_text("model:\n  modality: avx\n")
    with pytest.raises(MavsrError, match="modality"):
        C.load(p)
