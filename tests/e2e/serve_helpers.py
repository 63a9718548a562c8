"""A `mavsr serve` process for the tests: started on a free loopback port, called over real HTTP."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import httpx

MAVSR = [sys.executable, "-m", "mavsr_cli"]
ENDPOINT = "/v1/audio/transcriptions"


class Served:
    """`mavsr serve --exp exp/t --port 0 ARGS` in recipe dir `d`, its stderr collected; ready on return."""

    def __init__(self, d: Path, *args: str, tmp: Path, key: str | None = None, timeout: float = 300) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp, self.key, self.lines = tmp, key, []
        env = dict(os.environ, HF_HUB_OFFLINE="1", MAVSR_QUIET="1", TMPDIR=str(tmp))
        if key:
            env["MAVSR_API_KEY"] = key
        self.proc = subprocess.Popen(MAVSR + ["serve", "--exp", "exp/t", "--dir", str(d), "--port", "0", *args],
                                     cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait(lambda: next((m.group(1) for x in self.lines
                                            if (m := re.search(r"listening on (http://\S+)", x))), None), timeout)
        self._wait(lambda: self._healthy(), timeout)
        self._wait(lambda: "serve: ready" in self.lines, timeout)  # its start-up lines read too (its own thread)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def _wait(self, probe, timeout: float):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = probe()
            if got:
                return got
            assert self.proc.poll() is None, "mavsr serve exited:\n" + "\n".join(self.lines[-30:])
            time.sleep(0.1)
        raise AssertionError("mavsr serve did not come up:\n" + "\n".join(self.lines[-30:]))

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post(self, media: Path | bytes, name: str = "clip.mp4", headers: dict | None = None, **fields):
        body = media if isinstance(media, bytes) else Path(media).read_bytes()
        return httpx.post(self.url + ENDPOINT, files={"file": (name, body)}, headers=self.auth if headers is None
                          else headers, data={k: str(v) for k, v in fields.items()}, timeout=300)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", headers=self.auth, timeout=30).text

    def stop(self, sig=signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def metric(text: str, name: str, **labels) -> float:
    """The sum of a Prometheus sample over the series matching the labels given."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) == name:
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
    return total


def clips_of(d: Path) -> list[tuple[dict, Path]]:
    recs = [json.loads(x) for x in (d / "data/test/manifest.jsonl").read_text().splitlines()]
    return [(r, d / r["video"]) for r in recs]


def write_wav(path: Path, samples) -> Path:
    import numpy as np

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path
