import pytest

from mavsr_cli.errors import MavsrError
from mavsr_cli.rates import Rates, grid, require, select


def test_tags_round_trip():
    for tag in ["a16v5", "a4", "v2", "a1v1"]:
        assert Rates.parse(tag).tag == tag
    assert Rates.parse("a16v5") == Rates(16, 5)
    assert Rates(16, 5).pair == "(16,5)"
    assert Rates(None, 5).pair == "(-,5)"


@pytest.mark.parametrize("bad", ["", "x4", "a0v2", "v", "16,5", "a4v2v3"])
def test_bad_tags_are_user_errors(bad):
    with pytest.raises(MavsrError):
        Rates.parse(bad)


def test_grid_is_the_paper_grid():
    g = grid([4, 16], [2, 5])
    assert [r.tag for r in g] == ["a4v2", "a4v5", "a16v2", "a16v5"]
    assert [r.tag for r in grid([2, 4], None)] == ["a2", "a4"]


def test_tokens_per_second_follow_rates():
    # docs/method.md: (16,5) = 50/16 + 25/5 = 8.125 tokens per second
    assert Rates(16, 5).tokens_per_second() == pytest.approx(8.125)
    assert Rates(4, 2).tokens_per_second() > Rates(16, 5).tokens_per_second()


def test_select_and_require_name_the_trained_grid():
    g = grid([4, 16], [2, 5])
    assert select("all", g) == g
    assert select("a4v2,a16v5", g) == [Rates(4, 2), Rates(16, 5)]
    with pytest.raises(MavsrError, match="a4v2, a4v5, a16v2, a16v5"):
        select("a8v2", g)
    with pytest.raises(MavsrError, match="not in the trained grid"):
        require(Rates(16, 1), g)
    with pytest.raises(MavsrError, match="v5 has no audio rate"):  # one rate of an audio-visual model
        require(Rates(None, 5), g)
    with pytest.raises(MavsrError, match="a16 has no video rate"):
        require(Rates(16, None), g)
    with pytest.raises(MavsrError, match="not in the trained grid"):  # an audio-only model given a video rate
        require(Rates(4, 2), [Rates(4, None), Rates(16, None)])


def test_media_tokens_count_what_the_projectors_pool():
    """Rates.media_tokens (what --budget counts) is the length compress() gives each stream."""
    import torch

    from mavsr_cli.model.compress import compress

    for a_rate, v_rate in ((1, 1), (4, 2), (16, 5), (3, None), (None, 5)):
        r = Rates(a_rate, v_rate)
        for ta, tv in ((0, 0), (1, 1), (15, 4), (16, 5), (124, 62), (301, 150)):
            want = sum(int(compress(torch.zeros(1, max(t, 1), 2), torch.tensor([t]), rate)[1])
                       for t, rate in ((ta, a_rate), (tv, v_rate)) if rate)
            assert r.media_tokens(ta, tv) == want, (r, ta, tv)
