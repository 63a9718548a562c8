"""torchaudio guard: mavsr (and transformers after it) must import whatever state torchaudio is in."""

import math
import os
import subprocess
import sys
import textwrap

import torch

from mavsr_cli import compat

PROBE = textwrap.dedent("""
    import mavsr_cli, mavsr_cli.compat as c
    import transformers
    from transformers import WhisperFeatureExtractor, LlamaForCausalLM  # these pull in audio utils
    import peft
    import torch
    y = c.resample(torch.zeros(1, 22050), 22050, 16000)
    assert y.shape == (1, 16000), y.shape
    print("OK", "usable" if c.TORCHAUDIO is not None else "unusable", c.TORCHAUDIO_ERROR)
""")


def _run(tmp_path, extra_path=None, env_extra=None):
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = str(extra_path) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)


def test_imports_with_the_installed_torchaudio(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("OK")


def test_imports_with_a_torchaudio_whose_library_does_not_load(tmp_path):
    fake = tmp_path / "fake" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise OSError('undefined symbol: _ZN3c10 (simulated CUDA build)')\n")
    r = _run(tmp_path, tmp_path / "fake")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK unusable OSError: undefined symbol" in r.stdout


def test_imports_with_a_torchaudio_that_imports_but_fails_on_use(tmp_path):
    fake = tmp_path / "fake" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "functional.py").write_text("def resample(*a, **k):\n"
                                        "    raise RuntimeError('torchaudio::_resample not found')\n")
    r = _run(tmp_path, tmp_path / "fake")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK unusable RuntimeError" in r.stdout


def test_without_torchaudio_transformers_sees_it_absent(tmp_path):
    r = _run(tmp_path, env_extra={"MAVSR_NO_TORCHAUDIO": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK unusable disabled" in r.stdout


def test_fallback_resampler_is_band_limited_and_accurate():
    sr_in, sr_out, f = 22050, 16000, 440.0
    t = torch.arange(sr_in, dtype=torch.float64) / sr_in
    x = torch.sin(2 * math.pi * f * t)[None]
    y = compat._sinc_resample(x, sr_in, sr_out)
    assert y.shape == (1, sr_out)
    t2 = torch.arange(sr_out, dtype=torch.float64) / sr_out
    ref = torch.sin(2 * math.pi * f * t2)
    err = (y[0, 200:-200] - ref[200:-200]).abs().max().item()
    assert err < 2e-3
    # a tone above the new Nyquist frequency is removed, not aliased
    hi = torch.sin(2 * math.pi * 10000 * t)[None]
    assert compat._sinc_resample(hi, sr_in, sr_out)[0, 200:-200].abs().max().item() < 0.05
    if compat.TORCHAUDIO is not None:  # agree with torchaudio where it works
        ta = compat.TORCHAUDIO.resample(x.float(), sr_in, sr_out)
        assert (ta[0, 200:-200] - y[0, 200:-200].float()).abs().max().item() < 5e-3
