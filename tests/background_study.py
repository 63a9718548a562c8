"""The reduced synthetic study (tests/e2e/test_study.py) runs in the background beside the suite.

It takes minutes of torch compute, while the rest of the suite mostly waits on process start-ups:
one process of the run starts it as soon as collection says its test will run (the xdist
controller when the suite runs in workers, else pytest itself), its test goes last and waits for
the exit status the study's shell writes into its directory. The starter stops and removes it at
the end of the session. Every process then uses one thread (ONE_THREAD): two processes of two
OpenMP threads each on two cores ran the study's encoder pretraining 4x slower than alone (measured).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY_TEST = "test_study.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The reduced study trains small models for a few minutes, which makes its numbers sensitive to the
# last bits of every kernel: the same code gave claim 1 at (16,2) a margin of +8.68 (bound +8) with
# AVX-512 kernels and passed with AVX2 ones (2026-12-02, recipes/synth/RESULTS.md). Its processes
# use the AVX2 kernels of torch, MKL and oneDNN, so it computes the same on any x86-64 CPU with AVX2.
AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

_started: subprocess.Popen | None = None  # in the process that started it


def base() -> Path:
    """The run's study directory: named after the process that starts it (an xdist worker's parent
    is the controller), so that every process of one run finds the same one."""
    owner = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
    return Path(tempfile.gettempdir()) / f"mavsr-study-{owner}"


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start() -> None:
    """`study.sh --small` in a copy of recipes/synth under base(); its shell writes `rc` when done."""
    global _started
    if _started is not None:
        return
    d = base() / "synth"
    if d.parent.exists():
        shutil.rmtree(d.parent)  # a dead run's, whose pid came round again
    d.mkdir(parents=True)
    for f in ("study.sh", "conf"):
        src = ROOT / "recipes/synth" / f
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / f)
    env = dict(os.environ, HF_HUB_OFFLINE="1", MAVSR_QUIET="1", **ONE_THREAD, **AVX2_KERNELS,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    script = 'bash study.sh --small > ../study.log 2>&1; echo $? > ../rc.part && mv ../rc.part ../rc'
    # its own process group, so the whole study can be stopped; its shell also gets SIGTERM if the
    # starter dies without cleaning up
    _started = subprocess.Popen(["bash", "-c", script], cwd=d, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)


def wait(timeout: float) -> tuple[int, str, Path]:
    """(the study's exit status, its log, its recipe dir), once it has ended."""
    b = base()
    end = time.monotonic() + timeout
    while not (b / "rc").exists():
        assert b.exists(), f"no study was started in {b}"
        assert time.monotonic() < end, f"the study did not end within {timeout:.0f} s"
        time.sleep(2)
    return int((b / "rc").read_text()), (b / "study.log").read_text(), b / "synth"


def stop() -> None:
    """In the starter, at the end of the session: the study stopped if it still runs, its files removed."""
    if _started is None:
        return
    if _started.poll() is None:
        os.killpg(_started.pid, signal.SIGTERM)
        _started.wait(timeout=60)
    shutil.rmtree(base(), ignore_errors=True)
