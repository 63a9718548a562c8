"""The server's encoding step (serving/app.py through transcription.Transcriber.encode): the uploads
read by the time the encoder is free go to it in one call, and one that fails to encode fails alone."""

import asyncio
import tempfile
import types

import numpy as np
import torch

from mavsr_cli.errors import MavsrError
from mavsr_cli.options import ServeOptions
from mavsr_cli.serving.app import Refused, Server
from mavsr_cli.serving.batcher import Job
from mavsr_cli.transcription import Clip, EncoderInputs, Transcriber


class FailingOn:
    """A batch-invariant audio encoder (as faithful Whisper is) that refuses a clip of one length."""

    batch_invariant = True

    def __init__(self, bad_length):
        self.bad, self.calls = bad_length, []

    def encode_batch(self, wavs):  # row b: clip b's samples as features, zero-padded to the longest
        self.calls.append([len(w) for w in wavs])
        if any(len(w) == self.bad for w in wavs):
            raise MavsrError("audio of 31.0 s is longer than Whisper's 30 s window")
        h = torch.zeros(len(wavs), max(len(w) for w in wavs), 1)
        for b, w in enumerate(wavs):
            h[b, : len(w), 0] = torch.as_tensor(w)
        return h, torch.tensor([len(w) for w in wavs])


def test_uploads_waiting_are_encoded_in_one_call_and_a_bad_one_fails_alone(tmp_path):
    enc = FailingOn(bad_length=5)
    tr = types.SimpleNamespace(modality="a", _audio_encoder=lambda: enc)  # Transcriber.encode's needs
    tr.encode = lambda items, **kw: Transcriber.encode(tr, items, **kw)
    engine = types.SimpleNamespace(name="t", tr=tr)
    wavs = [np.arange(n, dtype=np.float32) for n in (3, 5, 4)]
    jobs = [Job(engine, None, None, 1, 4, 0.0, inputs=EncoderInputs(w, None, 0.1, None)) for w in wavs]
    saved = tempfile.tempdir  # the server sends this process's temporary files to its private dir
    srv = Server([engine], ServeOptions(), tmp_path)
    try:
        async def scenario():
            return await asyncio.gather(*(srv.encode(j) for j in jobs), return_exceptions=True)

        got = asyncio.run(scenario())
    finally:
        tempfile.tempdir = saved
        srv.prep.shutdown()
    assert enc.calls == [[5, 4, 3], [5], [4], [3]]  # together, longest first; then, as one failed, each alone
    assert isinstance(jobs[0].clip, Clip) and jobs[1].clip is None and isinstance(jobs[2].clip, Clip)
    for j in (0, 2):
        assert torch.equal(jobs[j].clip.feats["audio"][:, 0], torch.as_tensor(wavs[j]))
    assert got[0] is None and got[2] is None
    assert isinstance(got[1], Refused) and (got[1].status, got[1].kind) == (422, "no_stream")
    assert "30 s window" in got[1].message and srv.encoder is None  # the encoding task has ended
    assert all(j.inputs is None and j.encode_seconds > 0 for j in jobs)  # each charged its share, retries too
