import pytest

from mavsr_cli import manifest as mf
from mavsr_cli.errors import MavsrError
from mavsr_cli.fsutil import atomic_write_text, staged_dir
from mavsr_cli.recipe import is_done


def utt(i):
    return mf.Utterance(id=i, video=f"v/{i}.mp4", audio=f"v/{i}.wav", text="hi there", num_frames=50,
                        duration=2.0, speaker="s")


def test_manifest_round_trip_sorted(tmp_path):
    p = tmp_path / "m.jsonl"
    mf.write(p, [utt("b"), utt("a")])
    assert [u.id for u in mf.read(p)] == ["a", "b"]


def test_manifest_errors(tmp_path):
    p = tmp_path / "m.jsonl"
    with pytest.raises(MavsrError, match="duplicate"):
        mf.write(p, [utt("a"), utt("a")])
    p.write_text('{"id": "a"}\n')
    with pytest.raises(MavsrError, match="missing field"):
        mf.read(p)
    p.write_text("{not json\n")
    with pytest.raises(MavsrError, match=":1: not valid JSON"):
        mf.read(p)
    with pytest.raises(MavsrError, match="not found"):
        mf.read(tmp_path / "nope.jsonl")


def test_staged_dir_is_all_or_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("crash")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with staged_dir(final) as tmp:
        (tmp / "whole.txt").write_text("y")
    assert is_done(final) and (final / "whole.txt").read_text() == "y"


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a" / "f.txt", "hello")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.txt"]
