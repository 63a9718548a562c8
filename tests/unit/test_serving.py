"""The server's encoding step (serving/app.py): the uploads read by the time the encoder is free go
to it in one call, and one that fails to encode fails alone."""

import asyncio
import tempfile
import types

from mavsr_cli.errors import MavsrError
from mavsr_cli.options import ServeOptions
from mavsr_cli.serving.app import Refused, Server
from mavsr_cli.serving.batcher import Job


def test_uploads_waiting_are_encoded_in_one_call_and_a_bad_one_fails_alone(tmp_path):
    calls = []

    def encode(items):  # the prep thread's work: Transcriber.encode's contract, inputs -> clips
        calls.append(list(items))
        if "bad" in items:
            raise MavsrError("audio of 31.0 s is longer than Whisper's 30 s window")
        return [f"clip of {x}" for x in items]

    engine = types.SimpleNamespace(name="t", tr=types.SimpleNamespace(encode=encode))
    jobs = [Job(engine, None, None, 1, 4, 0.0, inputs=x) for x in ("a", "bad", "b")]
    saved = tempfile.tempdir  # the server sends this process's temporary files to its private dir
    srv = Server([engine], ServeOptions(), tmp_path)
    try:
        async def scenario():
            return await asyncio.gather(*(srv.encode(j) for j in jobs), return_exceptions=True)

        got = asyncio.run(scenario())
    finally:
        tempfile.tempdir = saved
        srv.prep.shutdown()
    assert calls == [["a", "bad", "b"], ["a"], ["bad"], ["b"]]  # together; then, as one failed, each alone
    assert [j.clip for j in jobs] == ["clip of a", None, "clip of b"]
    assert got[0] is None and got[2] is None
    assert isinstance(got[1], Refused) and (got[1].status, got[1].kind) == (422, "no_stream")
    assert "30 s window" in got[1].message and srv.encoder is None  # the encoding task has ended
