import pytest
import torch

from mavsr_cli.model.compress import compress


def naive(x, lengths, rate, mode):
    """Per-utterance reference: pool inside the true length, drop the trailing partial group."""
    outs = []
    for i, n in enumerate(lengths.tolist()):
        u = x[i, :n]
        k = max(1, n // rate)
        groups = [u[j * rate:(j + 1) * rate] for j in range(k)]
        if mode == "avg":
            outs.append(torch.stack([g.mean(0) for g in groups]))
        else:
            outs.append(torch.stack([torch.cat([g.reshape(-1), g.new_zeros((rate - len(g)) * u.shape[1])])
                                     for g in groups]))
    return outs


@pytest.mark.parametrize("mode", ["avg", "stack"])
@pytest.mark.parametrize("rate", [1, 2, 3, 5, 16])
def test_matches_a_per_utterance_loop(mode, rate):
    g = torch.Generator().manual_seed(rate)
    lengths = torch.tensor([37, 1, 16, 50, 3])
    x = torch.randn(5, 50, 4, generator=g)
    y, ylen = compress(x, lengths, rate, mode)
    ref = naive(x, lengths, rate, mode)
    assert ylen.tolist() == [len(r) for r in ref]
    assert y.shape[1] == max(len(r) for r in ref)
    for i, r in enumerate(ref):
        torch.testing.assert_close(y[i, : len(r)], r)
        assert torch.all(y[i, len(r):] == 0)


@pytest.mark.parametrize("mode", ["avg", "stack"])
def test_padding_never_mixes_into_real_tokens(mode):
    lengths = torch.tensor([10, 7])
    x = torch.randn(2, 12, 3)
    y1, _ = compress(x, lengths, 4, mode)
    x2 = x.clone()
    x2[1, 7:] = 1e6  # garbage in the padding
    x2[0, 10:] = -1e6
    y2, _ = compress(x2, lengths, 4, mode)
    torch.testing.assert_close(y1, y2)


def test_shorter_than_rate_gives_one_token():
    x = torch.arange(6.0).reshape(1, 6, 1)
    y, ylen = compress(x, torch.tensor([3]), 16, "avg")
    assert ylen.tolist() == [1]
    assert y[0, 0, 0].item() == pytest.approx(1.0)  # mean of 0, 1, 2
