"""The reduced synthetic study (recipes/synth/study.sh --small) as CI runs it: every model the
paper's claims compare is trained and decoded, the bench and the claims report are written with
every comparison. Models trained in CI's minutes are at chance, so the accuracy verdicts are
reported, not asserted; the token counts of claim 4 do not depend on accuracy and are asserted."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from e2e_helpers import ROOT


def test_the_small_study_checks_every_claim(tmp_path):
    d = tmp_path / "synth"
    d.mkdir()
    for f in ("study.sh", "conf"):
        src = ROOT / "recipes/synth" / f
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / f)
    env = dict(os.environ, HF_HUB_OFFLINE="1", MAVSR_QUIET="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(["bash", "study.sh", "--small"], cwd=d, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads((d / "exp/bench/claims.json").read_text())
    verdicts = {c["number"]: c for c in out["claims"]}
    assert sorted(verdicts) == [0, 1, 2, 3, 4]
    # every comparison the claims need was made: 2 other strategies + MS against 4 baselines, the pooled
    # rate-1 model at both ends, AV vs audio-only at 0 and -5 dB for 4 pairs, 2 video-only rates
    checks = {n: [x["what"] for x in c["checks"]] for n, c in verdicts.items()}
    assert sum(" vs base_" in w for w in checks[1]) == 12
    assert sum("pooled at" in w for w in checks[2]) == 2
    assert sum(" dB" in w for w in checks[3]) == 8 and sum("video v" in w for w in checks[3]) == 2
    tokens = [x for x in verdicts[4]["checks"] if x["what"].startswith("media tokens/s")]
    assert len(tokens) == 4 and all(x["ok"] for x in tokens), tokens
    assert "decode time (16,5) / (4,2)" in checks[4]
    md = (d / "exp/bench/CLAIMS.md").read_text()
    for n, c in verdicts.items():  # the report states each verdict as claims.json has it
        title = "Accuracy targets" if n == 0 else f"Claim {n}"
        assert f"## {title}: {'HOLDS' if c['holds'] else 'FAILS'}" in md
    held = sum(verdicts[n]["holds"] for n in (1, 2, 3, 4))
    assert f"claims: {held} of 4 hold" in r.stdout
    for f in ("CLAIMS.md", "REPORT.md", "bench.csv", "wer_vs_tokens.png", "wer_vs_snr.png"):
        assert (d / "exp/bench" / f).is_file(), f
