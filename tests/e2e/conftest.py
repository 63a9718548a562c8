"""The tiny synthetic recipe the end-to-end tests share (built once per session, about a minute)."""

import pytest
import yaml
from e2e_helpers import ROOT, mavsr


@pytest.fixture(scope="session")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    (d / "conf").mkdir()
    conf = yaml.safe_load((ROOT / "recipes/synth/conf/synth.yaml").read_text())
    conf["train"].update(epochs=2, batch_size=8, log_every=1)
    (d / "conf/tiny.yaml").write_text(yaml.safe_dump(conf))
    mavsr(d, "prepare", "synth", "--num-utts", "16", "--test-utts", "4", "--speakers", "2", "--nj", "1")
    mavsr(d, "tiny-models", "--audio-dim", "32", "--video-dim", "32", "--llm-hidden", "64", "--audio-layers", "1",
          "--video-layers", "1", "--encoder-epochs", "1", "--lm-epochs", "1")
    mavsr(d, "extract-features", "--config", "conf/tiny.yaml")
    mavsr(d, "train", "--config", "conf/tiny.yaml", "--rates", "all", "--tag", "t")
    mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "2")
    mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5")
    mavsr(d, "score", "--exp", "exp/t")
    return d
