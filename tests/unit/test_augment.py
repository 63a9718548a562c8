"""Augmentation: SNR mixing, babble sources, time masking."""

import numpy as np
import pytest
import torch

from mavsr_cli import augment
from mavsr_cli import config as C
from mavsr_cli.errors import MavsrError


@pytest.mark.parametrize("snr", [-5.0, 0.0, 7.5, 20.0])
def test_noise_is_mixed_at_the_asked_snr(snr):
    rng = np.random.default_rng(0)
    speech = rng.standard_normal(16000).astype(np.float32) * 0.3
    noise = rng.standard_normal(5000).astype(np.float32) * 2.0  # shorter: tiled to length
    mixed = augment.mix_at_snr(speech, noise, snr)
    added = mixed.astype(np.float64) - speech
    got = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(added ** 2))
    assert mixed.shape == speech.shape and got == pytest.approx(snr, abs=0.05)


def test_babble_mixes_only_other_speakers_of_the_given_pool():
    speakers = {f"s{s}-{i}": f"s{s}" for s in range(4) for i in range(5)}
    rng = np.random.default_rng(1)
    for target in ("s0-0", "s3-4"):
        srcs = augment.pick_babble_sources(speakers, target, 6, rng)
        assert len(srcs) == 6 == len(set(srcs))
        assert all(speakers[s] != speakers[target] for s in srcs)
        assert all(s in speakers for s in srcs)  # never anything outside the (training) pool
    lone = {"a": "x", "b": "x"}  # one speaker: the other utterances, never the target itself
    assert augment.pick_babble_sources(lone, "a", 6, rng) == ["b"]
    wavs = [rng.standard_normal(n).astype(np.float32) * k for n, k in ((3000, 1), (9000, 5), (100, 0.1))]
    b = augment.babble(wavs, 8000, rng)
    assert b.shape == (8000,) and np.isfinite(b).all() and b.std() > 0


def test_time_masks_stay_inside_each_true_length_and_depend_only_on_their_seed():
    x = torch.ones(2, 200, 3)
    lengths = torch.tensor([200, 120])
    m = augment.time_mask(x, lengths, window=20, stride=50, seeds=[1, 2])
    masked = (m[..., 0] == 0)
    assert masked[0].sum() > 0 and masked[1].sum() > 0
    assert masked[0].sum() <= 4 * 19 and masked[1].sum() <= 2 * 19  # one span < window per stride
    assert torch.equal(m[1, 120:], x[1, 120:])  # padding untouched
    again = augment.time_mask(x[1:], lengths[1:], window=20, stride=50, seeds=[2])
    assert torch.equal(again[0], m[1])  # same seed, same mask, whatever the batch
    assert torch.equal(x, torch.ones(2, 200, 3))  # input not modified


def test_snr_settings_are_validated():
    assert C.snr_values(C.AugmentConfig(snrs=("-5", 10, "clean"))) == [-5.0, 10.0, None]
    with pytest.raises(MavsrError, match="neither .clean. nor a number"):
        C.validate(C.from_dict({"augment": {"snrs": ["loud"]}}))


def test_training_draws_the_original_as_well_as_the_copies():
    from mavsr_cli.train_loop import draw_copies

    counts = {"a": 1, "b": 3, "c": 0}
    draws = [draw_copies(counts, seed=5, epoch=e) for e in range(40)]
    assert draws[3] == draw_copies(counts, seed=5, epoch=3)  # a function of (seed, epoch)
    assert {d["a"] for d in draws} == {0, None}  # one copy: the copy or the original
    assert {d["b"] for d in draws} == {0, 1, 2, None}
    assert {d["c"] for d in draws} == {None}  # no copies: always the original
