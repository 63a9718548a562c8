"""Helpers of the end-to-end tests: run `mavsr` as a user does, snapshot a recipe dir."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAVSR = [sys.executable, "-m", "mavsr_cli"]


def mavsr(d: Path, *args, ok=True, cwd: Path | None = None):
    """`mavsr ARGS --dir d`, run in d (or in `cwd`)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", MAVSR_QUIET="1")
    r = subprocess.run(MAVSR + list(args) + ["--dir", str(d)], capture_output=True, text=True, env=env,
                       cwd=cwd or d, timeout=600)
    if ok:
        assert r.returncode == 0, f"mavsr {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def snapshot(d: Path) -> dict:
    """mtime of every file under the recipe's output dirs."""
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for sub in ("data", "dump", "exp", "models")
            for p in (d / sub).rglob("*") if p.is_file()}


def refused(d: Path, *args) -> str:
    """Run a command that must be refused in one line (exit 2) with nothing written; returns that line."""
    before = snapshot(d)
    r = mavsr(d, *args, ok=False)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert snapshot(d) == before  # nothing written
    return err[0]


def av_dump(d: Path) -> Path:
    """The audio-visual feature cache of the shared recipe (other tests add caches beside it)."""
    import json

    return d / "dump" / json.loads((d / "exp/t/meta.json").read_text())["encoders_tag"]
