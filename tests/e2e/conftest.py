"""The tiny synthetic recipe the end-to-end tests share (built once per session, about a minute)."""

import os
import shutil
import signal
import sys

import pytest
import yaml
from e2e_helpers import ONE_THREAD, ROOT, STUDY_TEST, Study, mavsr, start_study


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


# The reduced study (test_study.py) runs beside the rest of the suite: it starts as soon as collection
# says its test will run, and its test goes last and waits for it (e2e_helpers.start_study).
def pytest_collection_modifyitems(items):
    study = [i for i in items if i.path.name == STUDY_TEST]
    if study:
        items[:] = [i for i in items if i.path.name != STUDY_TEST] + study


def pytest_collection_finish(session):
    if any(i.path.name == STUDY_TEST for i in session.items):
        os.environ.update(ONE_THREAD)  # the mavsr processes the other tests start
        if "torch" in sys.modules:  # and this one
            sys.modules["torch"].set_num_threads(1)
        start_study()


def pytest_sessionfinish(session):
    if Study.proc is not None:
        if Study.proc.poll() is None:
            os.killpg(Study.proc.pid, signal.SIGTERM)
            Study.proc.wait(timeout=60)
        shutil.rmtree(Study.dir.parent, ignore_errors=True)
