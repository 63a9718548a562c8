import pytest

from mavsr_cli.scoring import normalise, score


def test_normaliser():
    assert normalise("  Hello, WORLD!  it's   fine. ") == "hello world it's fine"


def test_wer_counts_each_error_kind():
    r = score(["a b c d", "e f"], ["a x c", "e f g"])  # 1 sub + 1 del, 1 ins
    assert (r["sub"], r["del"], r["ins"], r["ref_words"]) == (1, 1, 1, 6)
    assert r["wer"] == pytest.approx(50.0)


def test_empty_hypothesis_is_all_deletions():
    r = score(["one two three"], [""])
    assert r["del"] == 3 and r["wer"] == pytest.approx(100.0)


def test_pareto_front_and_snr_lists():
    from mavsr_cli.stages.bench import pareto, parse_snrs

    # (tokens/s, WER): the cheap one and the accurate one are on the front; the third is beaten
    assert pareto([(10, 30.0), (30, 10.0), (20, 35.0), (20, 20.0)]) == [True, True, False, True]
    assert pareto([(10, 5.0), (10, 5.0)]) == [True, True]  # equal points do not dominate each other
    assert parse_snrs("clean, 10,5,-5,clean") == (None, 10.0, 5.0, -5.0)
