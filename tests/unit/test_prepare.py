import pytest

from mavsr_cli import manifest as mf
from mavsr_cli.errors import MavsrError
from mavsr_cli.recipe import Recipe
from mavsr_cli.stages.prepare import SynthOptions, run_synth

OPT = SynthOptions(num_utts=6, test_utts=3, speakers=2, seed=3, nj=1)


def test_prepare_synth_writes_manifests_and_resumes(tmp_path):
    r = Recipe(tmp_path)
    summary = run_synth(r, OPT, log=lambda m: None)
    assert summary == {"train": (5, 0), "val": (1, 0), "test": (3, 0)}  # a seeded share held out, one at least
    train, val = mf.read(r.manifest("train")), mf.read(r.manifest("val"))
    assert not {u.id for u in train} & {u.id for u in val}
    assert [u.speaker for u in train + val].count("spk00") == 3
    for u in train:
        assert (tmp_path / u.video).is_file() and (tmp_path / u.audio).is_file()
        assert u.num_frames > 10 and u.text == u.text.lower()
    assert set(u.text for u in mf.read(r.manifest("test"))).isdisjoint(u.text for u in train)
    for name in ("config.yaml", "cmd.txt", ".done", "skipped.txt"):
        assert (r.data("train") / name).is_file()
    # a rerun is a no-op
    before = r.manifest("train").stat().st_mtime_ns
    assert run_synth(r, OPT, log=lambda m: None) == {}
    assert r.manifest("train").stat().st_mtime_ns == before


def test_bad_media_are_counted_and_skipped_not_fatal(tmp_path):
    r = Recipe(tmp_path)
    run_synth(r, OPT, log=lambda m: None)
    n = len(mf.read(r.manifest("train")))
    corpus = tmp_path / "corpus" / "synth" / "trainval"
    (corpus / "spk00" / "00000.mp4").write_bytes(b"\x00" * 100)  # corrupt video
    (corpus / "spk01" / "00001.mp4").unlink()  # missing video: generation restores it
    (corpus / "spk00" / "00002.txt").write_text("no header here\n")  # malformed text
    (corpus / "spk01" / "00003.pkl").write_bytes(b"\x80\x02]q\x00.")  # an empty landmark list
    msgs = []
    summary = run_synth(r, OPT, force=True, log=msgs.append)
    assert summary["train"] == (n - 3, 3)
    assert len(mf.read(r.manifest("train"))) == n - 3
    listed = (r.data("train") / "skipped.txt").read_text()
    assert "spk00/00000.mp4" in listed and "cannot open" in listed
    assert "spk00/00002.mp4" in listed and "Text:" in listed
    assert "spk01/00003.mp4" in listed and "landmark list has 0 frames" in listed
    assert any("3 skipped" in m for m in msgs)


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(MavsrError):
        run_synth(Recipe(tmp_path), SynthOptions(num_utts=2, test_utts=1, speakers=2, heldout_speakers=2))
    with pytest.raises(MavsrError, match="--words-per-slot"):
        run_synth(Recipe(tmp_path), SynthOptions(num_utts=2, test_utts=1, speakers=2, words_per_slot=-1))
    assert not (tmp_path / "corpus").exists()


def test_a_rerun_must_ask_for_the_same_corpus(tmp_path):
    r = Recipe(tmp_path)
    run_synth(r, OPT, log=lambda m: None)
    spk = tmp_path / "corpus/synth/trainval/spk00"
    before = {p.name: p.stat().st_mtime_ns for p in spk.iterdir()}
    other = SynthOptions(num_utts=6, test_utts=3, speakers=2, seed=4, nj=1)
    # the finished splits name what differs
    with pytest.raises(MavsrError, match="seed 3 != 4"):
        run_synth(r, other, log=lambda m: None)
    # an unfinished one (killed before its manifest): another seed in the same tree would keep the
    # old utterances beside new ones, a clear error instead
    for split in ("train", "val", "test"):
        (r.data(split) / ".done").unlink()
    with pytest.raises(MavsrError, match="--seed 4 \\(was 3\\)"):
        run_synth(r, other, log=lambda m: None)
    assert {p.name: p.stat().st_mtime_ns for p in spk.iterdir()} == before
    # more utterances of the same corpus are fine (the old ones are kept, the new ones added)
    more = SynthOptions(num_utts=8, test_utts=3, speakers=2, seed=3, nj=1)
    got = run_synth(r, more, force=True, log=lambda m: None)
    assert got["train"][0] + got["val"][0] == 8 and got["val"][0] >= 1
    assert all(spk.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())
    # --force with another seed generates the corpus again
    texts = [u.text for u in mf.read(r.manifest("train"))]
    assert run_synth(r, other, force=True, log=lambda m: None)["train"] == (5, 0)
    assert [u.text for u in mf.read(r.manifest("train"))] != texts[:6]
