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


@pytest.mark.parametrize("name", ["avsr_ms", "avsr_mss", "asr_ms", "vsr_ms"])
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
    if cfg.model.modality == "av":
        assert keys == {"a4", "a16", "v2", "v5"} and set(enc) == {"audio", "video"}
    elif cfg.model.modality == "a":
        assert keys == {f"a{r}" for r in (2, 4, 6, 8, 10)} and set(enc) == {"audio"}
    else:
        assert keys == {f"v{r}" for r in (1, 2, 3, 4, 5)} and set(enc) == {"video"}
    adapters = {n.split(".lora_A.")[1].split(".")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    want = {"ms"} | (set(grid) if cfg.model.lora.strategy == "mss" else set())
    assert adapters == want
