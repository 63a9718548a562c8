"""Every shipped recipe config loads, and the paper-sized models build from them on the meta device."""

from pathlib import Path

import pytest

from mavsr_cli import config as C
from mavsr_cli.model.meta import PUBLISHED_M, build_on_meta

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(ROOT.glob("recipes/*/conf/*.yaml"))


def test_recipes_ship_configs():
    names = {f"{p.parent.parent.name}/{p.name}" for p in CONFIGS}
    for corpus in ("lrs3", "lrs2"):
        assert {f"{corpus}/{n}" for n in ("avsr_ms.yaml", "avsr_ss.yaml", "avsr_mss.yaml", "asr_ms.yaml",
                                          "vsr_ms.yaml")} <= names
    assert "synth/synth.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_shipped_config_loads(path):
    cfg = C.load(path)
    assert cfg.model.rate_grid()


@pytest.mark.parametrize("name", ["avsr_ms", "avsr_mss", "asr_ms", "vsr_ms", "table5_avsr_ms", "omni_vsr_ms"])
def test_lrs3_models_build_on_the_meta_device(name):
    cfg = C.load(ROOT / f"recipes/lrs3/conf/{name}.yaml")
    model, enc = build_on_meta(cfg)
    llm = cfg.model.llm.split("/")[-1]
    base = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" not in n)
    assert base / 1e6 == pytest.approx(PUBLISHED_M[llm], abs=0.1)  # the published size, nothing downloaded
    assert {p.device.type for p in model.parameters()} == {"meta"}
    grid = [r.tag for r in model.grid]
    assert grid == [r.tag for r in cfg.model.rate_grid()]
    keys = set(model.projectors.keys())
    m = cfg.model
    want = ({f"a{r}" for r in m.audio_rates} if "a" in m.modality else set()) | \
           ({f"v{r}" for r in m.video_rates} if "v" in m.modality else set())
    assert keys == want and set(enc) == {"audio", "video"} - ({"audio"} if "a" not in m.modality else set()) - \
           ({"video"} if "v" not in m.modality else set())
    adapters = {n.split(".lora_A.")[1].split(".")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    want = {"ms"} | (set(grid) if cfg.model.lora.strategy == "mss" else set())
    assert adapters == want


# The authors' code (Omni-AVSR's Llama-MTSK command and train_LlamaAVSR.py's defaults) on each
# difference issue 20 lists; the configs that follow that code must say the same.
AUTHORS_CODE = {
    "audio_encoder.normalize": True,  # layer_norm of the waveform before the log-mel, train and test
    "audio_encoder.fit_video": True,  # AV data: audio cut or padded to len(video) * 640 samples
    "audio_encoder.path": "openai/whisper-medium.en",  # --audio-encoder-name
    "model.projector_layernorm": True,  # LayerNorm unless --no-layernorm-projector
    "model.lora.dropout": 0.0,  # their LoRA has none
    "lora_scale": 0.125,  # --rank 32 --alpha 4: alpha / rank
    "lora_width": 64,  # round(2048 / 32)
    "train.max_frames": 1500,  # --max-frames-audiovisual 1500 ...
    "train.max_frames_per": "gpu",  # ... per GPU
    "train.epochs": 8,  # --max-epochs 8
    "decode.beam": 15,  # --num-beams 15
    "decode.max_new_tokens": 32,  # --max-dec-tokens 32
}
FOLLOW_THE_CODE = ["avsr_ms", "avsr_ss", "avsr_mss", "omni_asr_ms", "omni_vsr_ms"]


def _value(cfg, key):
    if key == "lora_scale":
        return cfg.model.lora.alpha / cfg.model.lora.rank
    if key == "lora_width":
        return cfg.model.lora.rank
    section, *rest = key.split(".")
    v = getattr(cfg, section)
    for name in rest:
        v = getattr(v, name)
    return v


@pytest.mark.parametrize("corpus", ["lrs3", "lrs2"])
@pytest.mark.parametrize("name", FOLLOW_THE_CODE)
def test_configs_that_follow_the_authors_code_match_it_on_every_difference(corpus, name):
    cfg = C.load(ROOT / f"recipes/{corpus}/conf/{name}.yaml")
    assert {k: _value(cfg, k) for k in AUTHORS_CODE} == AUTHORS_CODE
    assert cfg.model.lora.targets == ("q_proj", "v_proj") and cfg.model.compression == "avg"
    assert cfg.model.llm == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize("corpus", ["lrs3", "lrs2"])
def test_the_papers_settings_differ_only_where_the_paper_does(corpus):
    t1 = C.load(ROOT / f"recipes/{corpus}/conf/table1_avsr_ms.yaml")
    assert (t1.audio_encoder.path, t1.model.projector_layernorm, t1.train.epochs) == ("openai/whisper-small", False, 10)
    assert t1.audio_encoder.normalize and t1.model.lora.dropout == 0.0  # the code of its time did both too
    t5 = C.load(ROOT / f"recipes/{corpus}/conf/table5_avsr_ms.yaml")
    assert (t5.audio_encoder.path, t5.model.llm) == ("openai/whisper-medium", "meta-llama/Llama-3.1-8B")
    assert t5.model.lora.alpha / t5.model.lora.rank == 0.125 and t5.model.lora.rank == 4096 // 64
    vsr = C.load(ROOT / f"recipes/{corpus}/conf/vsr_ms.yaml")
    assert (vsr.model.llm, vsr.model.lora.rank, vsr.model.lora.alpha / vsr.model.lora.rank) == \
        ("meta-llama/Llama-3.2-3B", 3072 // 32, 0.125)
    for strategy in ("ss", "mss"):
        for stem in ("avsr", "table1_avsr", "table5_avsr"):
            cfg = C.load(ROOT / f"recipes/{corpus}/conf/{stem}_{strategy}.yaml")
            base = C.load(ROOT / f"recipes/{corpus}/conf/{stem}_ms.yaml")
            assert cfg == C.with_lora_strategy(base, strategy)


@pytest.mark.parametrize("corpus", ["lrs3", "lrs2"])
def test_the_recipe_readme_gives_every_config_a_target_and_its_source(corpus):
    """Each shipped config has a row in the README's targets table: a WER (or 'none published')
    and where it comes from."""
    text = (ROOT / f"recipes/{corpus}/README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `") and ".yaml`" in line]
    named = {line.split("`")[1] for line in rows}
    shipped = {p.name for p in (ROOT / f"recipes/{corpus}/conf").glob("*.yaml")}
    assert shipped <= named, sorted(shipped - named)
    section = text.split("## Targets")[1].split("\n## ")[0]
    targets = [line for line in section.splitlines() if line.startswith("| `")]
    assert {line.split("`")[1] for line in targets} == shipped
    assert all(line.count("|") >= 5 for line in targets)
