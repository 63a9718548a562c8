"""One video front end for every stage (issue 22, item 2): a manifest's clip at another frame rate
or size reaches the encoder in extract-features exactly as `transcribe` would give it, and a clip
that disagrees with its manifest's num_frames is refused in one line."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e_helpers import mavsr
from safetensors.torch import load_file

from mavsr_cli.media import crop_resize, read_audio, read_video_at, read_video_gray, write_av


def _odd_recipe(d: Path, tmp_path: Path, num_frames: int | None = None) -> tuple[Path, dict]:
    """A recipe beside the shared one (its models and config) whose split `odd` holds the first test
    utterance's mouth re-rendered at 30 fps and 120x120, the manifest saying num_frames as at 25 fps."""
    rec = json.loads((d / "data/test/manifest.jsonl").read_text().splitlines()[0])
    roi = read_video_gray(d / rec["video"])  # (T, 96, 96) at 25 fps
    t = len(roi)
    n30 = round(t * 30 / 25)
    big = crop_resize(roi, None, 120)
    frames = np.stack([big[min(t - 1, k * 25 // 30)] for k in range(n30)])
    r = tmp_path / "odd"
    (r / "media").mkdir(parents=True)
    (r / "data/odd").mkdir(parents=True)
    os.symlink(d / "models", r / "models")
    os.symlink(d / "conf", r / "conf")
    write_av(r / "media/clip.mp4", frames, read_audio(d / rec["audio"]), fps=30)
    u = {**rec, "id": "odd-clip", "video": "media/clip.mp4", "audio": "media/clip.mp4",
         "num_frames": num_frames or t}
    (r / "data/odd/manifest.jsonl").write_text(json.dumps(u) + "\n")
    return r, u


def test_extract_features_resamples_and_crops_as_transcribe_does(recipe, tmp_path):
    from mavsr_cli import config as C
    from mavsr_cli.model.video_encoder import load_video_encoder
    from mavsr_cli.recipe import Recipe, resolve_model

    r, u = _odd_recipe(recipe, tmp_path)
    mavsr(r, "extract-features", "--config", "conf/tiny.yaml", "--split", "odd")
    (shard,) = r.glob("dump/*/odd/shard-*.safetensors")
    cached = load_file(str(shard))["odd-clip/video"].float()  # (T, D)
    assert len(cached) == u["num_frames"]  # 25 fps, not the clip's 30
    vc = C.load(r / "conf/tiny.yaml").video_encoder
    # transcribe's path: read at 25 fps by timestamps, the mouth crop resized to 96, centre crop, normalise
    roi = crop_resize(read_video_at(r / "media/clip.mp4", 25), None, 96)
    venc = load_video_encoder(resolve_model(Recipe(r), vc.path)).eval()
    y0 = (96 - vc.crop) // 2
    crop = torch.from_numpy(np.ascontiguousarray(roi[:, y0:y0 + vc.crop, y0:y0 + vc.crop]))
    with torch.inference_mode():
        want = venc((crop.float() / 255 - vc.mean) / vc.std).float()
    assert want.shape == cached.shape
    assert torch.allclose(cached, want, atol=2e-2, rtol=1e-2), (cached - want).abs().max()


@pytest.mark.parametrize("claimed", [80, 30])
def test_a_clip_longer_or_shorter_than_its_manifest_is_refused_in_one_line(recipe, tmp_path, claimed):
    r, u = _odd_recipe(recipe, tmp_path, num_frames=claimed)
    res = mavsr(r, "extract-features", "--config", "conf/tiny.yaml", "--split", "odd", ok=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "odd-clip: the video has" in res.stderr and f"manifest says num_frames {claimed}" in res.stderr
    assert not list(r.glob("dump/*/odd/.done")) and not list(r.glob("dump/*/odd/shard-*"))
