import os
import sys

# Tests never reach a model hub: every model is built from a config and saved locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MAVSR_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The mavsr commands tests start run on the CPU, where their exact equalities (batch sizes, shards,
# resumes) hold to the bit; the GPU tests name --device cuda.
os.environ.setdefault("MAVSR_DEVICE", "cpu")


import background_study  # noqa: E402  (tests/ is on sys.path: pytest puts a rootdir conftest's dir there)
import pytest  # noqa: E402


# The reduced study (e2e/test_study.py) runs beside the rest of the suite: it starts as soon as
# collection says its test will run (background_study), and its test goes last and waits for it.
def pytest_collection_modifyitems(items):
    study = [i for i in items if i.path.name == background_study.STUDY_TEST]
    if study:
        items[:] = [i for i in items if i.path.name != background_study.STUDY_TEST] + study


def pytest_collection_finish(session):
    if any(i.path.name == background_study.STUDY_TEST for i in session.items):
        os.environ.update(background_study.ONE_THREAD)  # the mavsr processes the other tests start
        if "torch" in sys.modules:  # and this one
            sys.modules["torch"].set_num_threads(1)
        if not os.environ.get("PYTEST_XDIST_WORKER"):  # in workers, the controller starts it
            background_study.start()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """In the xdist controller: a worker's collection (every worker collects the same tests)."""
    if any(background_study.STUDY_TEST in i for i in ids):
        background_study.start()


def pytest_sessionfinish(session):
    background_study.stop()
