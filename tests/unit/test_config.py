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


def test_a_config_states_only_its_difference_from_its_base(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  lora:\n    rank: 8\n    strategy: ms\ntrain:\n  epochs: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  lora:\n    strategy: ss\ntrain:\n")
    cfg = C.load(tmp_path / "b.yaml")
    assert (cfg.model.lora.rank, cfg.model.lora.strategy, cfg.train.epochs) == (8, "ss", 3)  # empty train: kept
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    with pytest.raises(MavsrError, match="comes back to itself"):
        C.load(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(MavsrError, match="the base of"):
        C.load(tmp_path / "c.yaml")


def test_an_experiment_config_of_mavsr_010_decodes_as_it_did(tmp_path):
    # 0.1.0 wrote decode.max_new_tokens (24, 32) but never read it: decoding was automatic
    old = C.Config().to_dict()
    old["audio_encoder"]["sample_rate"] = 16000
    old["decode"] = {"batch_size": 32, "max_new_tokens": 24}
    cfg = C.from_dict(old)
    assert (cfg.decode.max_new_tokens, cfg.decode.batch_size) == (0, 32)
    assert C.from_dict({"decode": {"max_new_tokens": 24}}).decode.max_new_tokens == 24  # a new config's is honoured


def test_decode_options_are_checked_and_the_pool_tag_is_clean():
    assert C.check_decode(C.DecodeConfig(pool=" a016v05 ")).pool == "a16v5"
    for bad in (dict(batch_size=0), dict(beam=0), dict(max_new_tokens=-1)):
        with pytest.raises(MavsrError, match=f"--{next(iter(bad)).replace('_', '-')} or decode"):
            C.check_decode(C.DecodeConfig(**bad))
    with pytest.raises(MavsrError, match="rate tag"):
        C.check_decode(C.DecodeConfig(pool="fast"))


def test_max_frames_caps_a_step_or_each_gpu():
    """train.max_frames_per: step (mavsr: the same batches on any number of processes) or gpu (the
    reference code's per-GPU cap: a step holds max_frames per process and micro-batch)."""
    from mavsr_cli.train_loop import step_frames

    step = C.from_dict({"train": {"max_frames": 1500, "accum_steps": 2}}).train
    gpu = C.from_dict({"train": {"max_frames": 1500, "accum_steps": 2, "max_frames_per": "gpu"}}).train
    assert [step_frames(step, w) for w in (1, 8)] == [1500, 1500]
    assert [step_frames(gpu, w) for w in (1, 8)] == [3000, 24000]
    with pytest.raises(MavsrError, match="max_frames_per must be step or gpu"):
        C.validate(C.from_dict({"train": {"max_frames_per": "node"}}))
