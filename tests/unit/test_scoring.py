import pytest

from mavsr_cli.scoring import normalise, wer


def test_normaliser():
    assert normalise("  Hello, WORLD!  it's   fine. ") == "hello world it's fine"


def test_wer_counts_each_error_kind():
    r = wer(["a b c d", "e f"], ["a x c", "e f g"])  # 1 sub + 1 del, 1 ins
    assert (r["sub"], r["del"], r["ins"], r["ref_words"]) == (1, 1, 1, 6)
    assert r["wer"] == pytest.approx(50.0)


def test_empty_hypothesis_is_all_deletions():
    r = wer(["one two three"], [""])
    assert r["del"] == 3 and r["wer"] == pytest.approx(100.0)
