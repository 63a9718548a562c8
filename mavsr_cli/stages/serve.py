"""`mavsr serve --exp exp/NAME`: an HTTP transcription server on uvicorn (the `serve` extra).

Reads: each experiment's config.yaml, checkpoint and models (as `transcribe` does). Writes nothing in
the recipe: uploads go to a private temporary dir (0700) and are removed after reading; the dir goes
at exit. The OpenAI-shaped endpoint, batching and the elastic controller are in mavsr_cli/serving/.
SIGINT or SIGTERM stops accepting, finishes the requests in flight (for up to GRACE_S), then exits.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import tempfile
from pathlib import Path

from ..errors import MavsrError
from ..options import SERVE_MAX_BEAM, ServeOptions
from ..rates import Rates
from ..recipe import Recipe

GRACE_S = 60  # on SIGTERM, requests still unanswered after this long are dropped
SERVE_EXTRA = "the server needs the serve extra: pip install 'mavsr[serve]' (make install adds it)"


def engines(recipe: Recipe, exps: list[Path], rates: str, log, device: str, beam: int | None = None) -> list:
    from ..serving.batcher import Engine
    from ..transcription import Transcriber

    fixed = None if rates == "auto" else Rates.parse(rates)
    out = []
    for exp in exps:
        tr = Transcriber(recipe, exp, log=log, device=device)
        if fixed is not None and fixed not in tr.dec.trained:
            raise MavsrError(f"--rates {fixed.tag} is not in {tr.dec.exp.name}'s trained grid: "
                             + ", ".join(r.tag for r in tr.dec.trained))
        out.append(Engine(tr, fixed, beam))
        if out[-1].beam > SERVE_MAX_BEAM:  # what a request may ask for is what the server may be told
            raise MavsrError(f"{tr.dec.exp.name} decodes at beam {out[-1].beam} (its config's decode.beam), "
                             f"above the server's 1 to {SERVE_MAX_BEAM}: pass --beam")
    mods = [e.modality for e in out]
    if len(set(mods)) < len(mods):
        raise MavsrError(f"two experiments of one modality ({', '.join(mods)}): uploads could not be routed")
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MavsrError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def run(recipe: Recipe, exps: list[Path], opts: ServeOptions, log=print) -> None:
    try:
        import uvicorn

        from ..serving.app import Server, create_app
    except ImportError:
        raise MavsrError(SERVE_EXTRA) from None
    if opts.rates != "auto":
        Rates.parse(opts.rates)
    if not is_loopback(opts.host) and not opts.api_key:
        log(f"serve: warning: listening on {opts.host} without an API key: anyone who reaches this address can "
            "use the server (give --api-key or MAVSR_API_KEY)")
    tmp = Path(tempfile.mkdtemp(prefix="mavsr-serve-"))  # 0700: this user's only
    try:
        srv = Server(engines(recipe, exps, opts.rates, log, opts.device, opts.beam), opts, tmp, log=log)
        sock = bind(opts.host, opts.port)
        host, port = sock.getsockname()[:2]
        log(f"serve: listening on http://{host}:{port} (rates {opts.rates}"
            + (f", p95 target {opts.slo_ms:g} ms" if opts.rates == "auto" else "") + "); loading the models")
        from .. import lifecycle

        lifecycle.interrupted_note = "stopped after answering the requests in flight"
        config = uvicorn.Config(create_app(srv), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=GRACE_S)
        uvicorn.Server(config).run(sockets=[sock])
        if srv.failed is not None:
            raise MavsrError(f"serve: could not start: {type(srv.failed).__name__}: {srv.failed}")
        log("serve: stopped")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
