import numpy as np
import pytest

from mavsr_cli.datasets import synth
from mavsr_cli.datasets.lrs_text import format_text, parse_text
from mavsr_cli.errors import MavsrError
from mavsr_cli.media import MediaError, read_audio, read_video_gray, write_av, write_wav
from mavsr_cli.tts import Espeak


def test_espeak_gives_audio_words_and_phonemes():
    s = Espeak.get().say("the quick brown fox", voice="en-us")
    assert s.sample_rate > 8000 and len(s.audio) > s.sample_rate * 0.5
    assert np.abs(s.audio).max() > 0.05
    assert len(s.words) == 4
    starts = [p.start for p in s.phones]
    assert len(s.phones) >= 10 and starts == sorted(starts)
    with pytest.raises(ValueError, match="no voice"):
        Espeak.get().say("hi", voice="xx-nonexistent")


def test_synthesis_is_the_same_in_every_process():
    """espeak-ng seeds its own random numbers (used by voice variants such as +f2) from the clock
    at start-up; the corpus must not depend on when a worker process started."""
    import subprocess
    import sys
    import time

    code = ("import hashlib, sys; from mavsr_cli.tts import Espeak; e = Espeak.get(); "
            "[e.say_isolated(t, voice='en-us') for t in sys.argv[1:]]; "
            "s = e.say_isolated('anna found the big apple', voice='en-gb-x-rp+f2'); "
            "print(hashlib.md5(s.audio.tobytes()).hexdigest())")
    runs = []
    for before in ([], ["please open the window"]):  # and whatever the process synthesized before
        if runs:
            time.sleep(1.1)  # another second on the clock
        runs.append(subprocess.run([sys.executable, "-c", code, *before], capture_output=True, text=True,
                                   check=True).stdout)
    assert runs[0] == runs[1]


def test_grammar_is_seeded_and_in_vocabulary():
    a = [synth.sentence(np.random.default_rng(5)) for _ in range(3)]
    assert len(set(a)) == 1
    vocab = set(synth.vocabulary())
    assert 200 <= len(vocab) <= 600
    rng = np.random.default_rng(0)
    for _ in range(200):
        assert set(synth.sentence(rng).split()) <= vocab


def test_a_smaller_grammar_draws_each_slot_from_its_first_words():
    assert synth.sentence(np.random.default_rng(5)) == synth.sentence(np.random.default_rng(5), 0)
    allowed = set(synth.vocabulary(2))
    assert "anna" in allowed and "ben" in allowed and "carla" not in allowed and "apples" in allowed
    rng, full = np.random.default_rng(0), np.random.default_rng(0)
    small = {w for _ in range(300) for w in synth.sentence(rng, 2).split()}
    assert small <= allowed and len(small) >= 0.9 * len(allowed)
    assert len({w for _ in range(300) for w in synth.sentence(full).split()}) > 2 * len(small)


def test_synthesis_is_deterministic_and_lips_move():
    spk = synth.make_speaker(0, 2)
    u1 = synth.synthesize("please open the window", spk, np.random.default_rng([1, 2]))
    u2 = synth.synthesize("please open the window", spk, np.random.default_rng([1, 2]))
    assert np.array_equal(u1.frames, u2.frames) and np.array_equal(u1.audio, u2.audio)
    assert len(u1.audio) == len(u1.frames) * 640  # 16 kHz audio, 25 fps video
    assert [w for w, _, _ in u1.words] == ["please", "open", "the", "window"]
    # the mouth region changes over time far more than the sensor noise does
    mouth = u1.frames[:, 40:80, 20:76].astype(float)
    assert mouth.std(0).mean() > 10


def test_visemes_differ_for_open_and_closed_sounds():
    assert synth.viseme("'a")[0] > 0.8 and synth.viseme("m")[0] == 0.0
    assert synth.viseme("u:")[2] > 0.9  # rounded
    assert synth.viseme("_:") == synth.viseme("???")  # rest


def test_text_file_round_trip(tmp_path):
    p = tmp_path / "00001.txt"
    p.write_text(format_text("put {NOISE} it here", [("put", 0.0, 0.2), ("it", 0.2, 0.4)]))
    text, words = parse_text(p)
    assert text == "PUT NOISE IT HERE" and words[1] == ("IT", 0.2, 0.4)
    p.write_text("Conf: 3\n")
    with pytest.raises(MavsrError, match="Text:"):
        parse_text(p)
    p.write_bytes(b"Text:  \xff\xfe bad\n")
    with pytest.raises(MavsrError, match="UTF-8"):
        parse_text(p)


def test_media_round_trip_and_errors(tmp_path):
    frames = np.full((30, 96, 96), 120, np.uint8)
    frames[:, 40:60, 30:70] = 20
    audio = (0.3 * np.sin(np.arange(30 * 640) / 16000 * 2 * np.pi * 300)).astype(np.float32)
    write_av(tmp_path / "a.mp4", frames, audio)
    write_wav(tmp_path / "a.wav", audio)
    v = read_video_gray(tmp_path / "a.mp4")
    assert v.shape == (30, 96, 96) and abs(int(v[5, 50, 50]) - 20) < 6
    assert np.allclose(read_audio(tmp_path / "a.wav"), audio, atol=1e-4)
    assert abs(len(read_audio(tmp_path / "a.mp4")) - len(audio)) < 2048  # AAC priming
    with pytest.raises(MediaError, match="not found"):
        read_video_gray(tmp_path / "missing.mp4")
    (tmp_path / "t.mp4").write_bytes((tmp_path / "a.mp4").read_bytes()[:600])
    with pytest.raises(MediaError):
        read_video_gray(tmp_path / "t.mp4")
    (tmp_path / "z.mp4").write_bytes(b"")
    with pytest.raises(MediaError):
        read_video_gray(tmp_path / "z.mp4")
    write_av(tmp_path / "silent.mp4", frames, None)
    with pytest.raises(MediaError, match="no audio stream"):
        read_audio(tmp_path / "silent.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "a.wav", "silent.mp4", "t.mp4", "z.mp4"]


def test_gray_frames_reach_the_encoder_as_swscale_would_make_them():
    import av
    import numpy as np

    from mavsr_cli.media import _yuv420p_frames

    frames = np.random.default_rng(0).integers(0, 256, (12, 96, 96), dtype=np.uint8)
    frames[0] = np.arange(96 * 96).reshape(96, 96) % 256  # every level
    ours = list(_yuv420p_frames(frames))  # all kept before any is read: no shared buffer
    for f, mine in zip(frames, ours, strict=True):
        ref = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="gray").reformat(format="yuv420p")
        assert (mine.to_ndarray() == ref.to_ndarray()).all()
