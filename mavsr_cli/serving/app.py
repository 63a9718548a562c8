"""The ASGI app of `mavsr serve` (FastAPI): the OpenAI-shaped transcription endpoint, health and
Prometheus metrics. Requests are admitted up to --max-queue, their upload copied into a private
temporary dir, read, then encoded on one thread (the uploads read by the time the encoder is free
in one call, where the encoder's features do not depend on the batch: transcription.Transcriber.encode),
decoded in batches on another (batcher.py).

  POST /v1/audio/transcriptions  multipart: file, and optional rates (auto or a tag), budget, beam,
                                 response_format (json | text | verbose_json); the OpenAI fields
                                 model, language, prompt and temperature are accepted as that API's
                                 clients send them (model is ignored; language en; temperature 0)
  GET  /healthz                  {"status": "ok", ...}, never behind the key
  GET  /metrics                  Prometheus text format
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import STREAMS
from ..decoding import Budget, pick_by_budget
from ..errors import MavsrError
from ..media import MediaError, TooLong, streams
from ..options import SERVE_MAX_BEAM, ServeOptions
from ..rates import Rates
from .batcher import Batcher, Done, Engine, Job
from .elastic import retry_after

FORMATS = ("json", "text", "verbose_json")
AUTO = (None, "", "auto")  # a `rates` field that leaves the pair to the server
LANGUAGES = (None, "", "en", "english")


def _too_large(opts: ServeOptions) -> Refused:  # a new one each time: a raised one keeps its traceback's frames
    return Refused(413, "too_large", f"the upload is over --max-upload-mb {opts.max_upload_mb:g}")


class Refused(Exception):
    """A request answered with a 4xx/5xx and one line: (status, kind, message, headers)."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def error_body(kind: str, message: str) -> dict:
    return {"error": {"message": message, "type": kind}}  # the shape OpenAI's clients read


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mavsr_requests", "Requests answered, by HTTP status", ["status"], registry=r)
        self.errors = Counter("mavsr_errors", "Requests refused or failed, by kind", ["kind"], registry=r)
        # transcriptions only: a refusal answered in a millisecond would pull the quantiles down
        self.latency = Histogram("mavsr_request_seconds", "Upload received to transcript, seconds (status 200)",
                                 registry=r, buckets=(0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6))
        self.queue = Gauge("mavsr_queue_length", "Requests admitted and not yet decoded", registry=r)
        self.in_flight = Gauge("mavsr_requests_in_flight", "Transcription requests being handled", registry=r)
        self.batch = Histogram("mavsr_batch_size", "Utterances per decoded batch", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.encode_batch = Histogram("mavsr_encode_batch_size", "Clips per successful encoder call, each "
                                      "encoder counted apart (an audio-visual upload: one audio and one video "
                                      "call); several only where an encoder's features do not depend on the "
                                      "batch", registry=r,
                                      buckets=(1, 2, 4, 8, 16, 32, 64))
        self.pairs = Counter("mavsr_rate_pair", "Utterances decoded, by experiment and rate pair",
                             ["experiment", "rates"], registry=r)


class Server:
    """The state behind the routes: engines, batcher, prep thread, temporary dir, metrics."""

    def __init__(self, engines: list[Engine], opts: ServeOptions, tmp: Path, log=print) -> None:
        """`tmp`: a private dir (0700) the caller removes; every upload, and the multipart parser's
        spooled copies (this process's tempfile.tempdir), are written there."""
        self.engines, self.opts, self.log, self.tmp = engines, opts, log, tmp
        tempfile.tempdir = str(tmp)
        self.failed: BaseException | None = None
        self.metrics = Metrics()
        self.batcher = Batcher(opts.max_batch, opts.batch_wait_ms / 1000, opts.slo_ms / 1000, self._on_batch)
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="mavsr-prep")
        self.admitted = 0
        self.uploads = 0
        self.to_encode: list[tuple[Job, asyncio.Future]] = []  # read, waiting for the encoder
        self.encoder: asyncio.Task | None = None  # the task encoding them, while there are any

    def _on_batch(self, job: Job, n: int, rates: Rates, seconds: float) -> None:
        self.metrics.batch.observe(n)
        self.metrics.pairs.labels(job.engine.name, rates.tag).inc(n)

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException as e:
            self.failed = e  # uvicorn logs it and returns; stages/serve.py says it in one line
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for e in self.engines:
            t0 = time.perf_counter()
            await loop.run_in_executor(self.prep, e.tr.load)
            await loop.run_in_executor(self.prep, self.batcher.measure, e, self.opts.warmup_seconds)
            costs = ", ".join(f"{r.tag} {self.batcher.cost.seconds(r, e.beam, 1):.3f} s" for r in e.pairs)
            self.log(f"serve: {e.name} ({e.modality}) loaded and measured in {time.perf_counter() - t0:.1f} s; "
                     f"one clip at beam {e.beam}: {costs}")
        self.task = asyncio.create_task(self.batcher.run())
        self.log("serve: ready")

    async def stop(self) -> None:
        for task in (self.task, self.encoder):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.batcher.close()
        self.prep.shutdown(wait=True)

    # ---- one request -------------------------------------------------------------------------
    def check_room(self) -> None:
        if self.admitted >= self.opts.max_queue:
            e, b = self.engines[0], self.batcher
            wait = retry_after(b.cost, e.pairs, e.beam, self.admitted, b.max_batch)
            raise Refused(503, "queue_full", f"the server has {self.admitted} requests queued (--max-queue "
                          f"{self.opts.max_queue}); retry in {wait} s", {"Retry-After": str(wait)})

    def admit(self) -> None:
        self.check_room()
        self.admitted += 1
        self.batcher.preparing += 1
        self.metrics.queue.set(self.batcher.queued)

    async def save(self, upload: UploadFile) -> Path:
        """The upload's bytes in a file of our own naming (the client's filename is never used)."""
        self.uploads += 1
        fd, name = tempfile.mkstemp(prefix=f"upload-{self.uploads}-", dir=self.tmp)
        limit, size = int(self.opts.max_upload_mb * (1 << 20)), 0
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(self.opts)
                    f.write(chunk)
            if size == 0:
                raise Refused(400, "not_media", "the upload is empty")
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def route(self, path: Path, label: str) -> Engine:
        """The engine for what the file holds: audio-visual first, then audio-only, then video-only."""
        try:
            have = streams(path)
        except MediaError:
            raise Refused(400, "not_media", f"{label} is not a media file PyAV can read") from None
        for e in sorted(self.engines, key=lambda e: "av a v".split().index(e.modality)):
            if set(STREAMS[e.modality]) <= have:
                return e
        served = " or ".join(f"{'+'.join(STREAMS[e.modality])} ({e.name})" for e in self.engines)
        got = "+".join(sorted(have)) or "no audio or video stream"
        raise Refused(422, "no_stream", f"{label} has {got}; this server decodes {served}")

    def prepare(self, path: Path, label: str, form: dict) -> Job:
        """On the prep thread: route and read the clip, resolve its rates, beam and token limit."""
        t0 = time.perf_counter()
        e, rates = self.route(path, label), None
        if form["rates"] not in AUTO:  # checked against the grid before the clip is read
            rates = Rates.parse(form["rates"])
            if rates not in e.tr.dec.trained:
                raise Refused(400, "bad_request", f"rates {rates.tag} are not in {e.name}'s trained grid: "
                              + ", ".join(r.tag for r in e.pairs))
        try:
            clip = e.tr.read(path, max_seconds=self.opts.max_seconds)
        except TooLong:
            raise Refused(413, "too_long", f"{label} is longer than --max-seconds {self.opts.max_seconds:g}") from None
        except MavsrError as err:
            raise Refused(422, "no_stream", str(err).replace(str(path), label)) from None
        if form["budget"] is not None:
            b = Budget(form["budget"], e.tr.dec.fixed_tokens(), (clip.counts(),))
            try:
                rates = pick_by_budget(e.tr.dec.trained, b, e.scores)[0]
            except MavsrError as err:
                raise Refused(400, "bad_request", str(err)) from None
        beam = form["beam"] or e.beam
        job = Job(e, None, rates, beam, e.max_new_tokens(clip.duration), form["arrived"],
                  encode_seconds=time.perf_counter() - t0, inputs=clip)
        if not e.tr.batches:  # nothing to share an encoder call with: encoded now, not behind later reads
            (err,) = self._encode_now(e, [job])
            if err is not None:
                raise err
        return job

    async def encode(self, job: Job) -> None:
        """Encode the job's upload into `job.clip`, together with the others read by the time the
        encoder is free: one task takes all that wait, experiment by experiment, to the prep thread."""
        future = asyncio.get_running_loop().create_future()
        self.to_encode.append((job, future))
        if self.encoder is None or self.encoder.done():
            self.encoder = asyncio.create_task(self._encode_waiting())
        await future

    async def _encode_waiting(self) -> None:
        loop, waiting = asyncio.get_running_loop(), []
        try:
            while self.to_encode:
                waiting, self.to_encode = self.to_encode, []
                for e in {id(j.engine): j.engine for j, _ in waiting}.values():
                    mine = [(j, f) for j, f in waiting if j.engine is e]
                    got = await loop.run_in_executor(self.prep, self._encode_now, e, [j for j, _ in mine])
                    for (_, f), r in zip(mine, got, strict=True):
                        if not f.done():  # its client may have gone
                            f.set_exception(r) if isinstance(r, BaseException) else f.set_result(None)
        except BaseException as err:  # stopped (or a bug): no request is left waiting for an answer
            stale, self.to_encode = waiting + self.to_encode, []
            for _, f in stale:
                if not f.done():
                    f.set_exception(err if isinstance(err, Exception) else RuntimeError("the server is stopping"))
            if not isinstance(err, Exception):
                raise
            self.log("serve: error: " + "".join(traceback.format_exception(err)).rstrip())  # and answered 500
        finally:
            self.encoder = None

    def _encode_now(self, e: Engine, jobs: list[Job]) -> list[BaseException | None]:
        """On the prep thread: the jobs' clips in one encoder call; a failed call's clips are encoded
        again each alone, so one bad upload fails alone (Transcriber.encode's `isolate`). Each job's
        encode_seconds gets its share of the time, retries included."""
        t0 = time.perf_counter()
        try:
            got = e.tr.encode([j.inputs for j in jobs], isolate=True, on_call=self.metrics.encode_batch.observe)
        except Exception as err:  # noqa: BLE001  (not one clip's: loading an encoder, say; answered per job)
            got = [err] * len(jobs)
        share = (time.perf_counter() - t0) / len(jobs)
        for j, c in zip(jobs, got, strict=True):
            j.inputs, j.encode_seconds = None, j.encode_seconds + share
            if not isinstance(c, BaseException):
                j.clip = c
        return [_encode_error(c) if isinstance(c, BaseException) else None for c in got]


def _encode_error(err: BaseException) -> BaseException:
    """What a request whose clip failed to encode is answered: a MavsrError is the clip's (422)."""
    return Refused(422, "no_stream", str(err)) if isinstance(err, MavsrError) else err


def check_form(rates, budget, beam, response_format, language, temperature) -> None:
    """Field values, refused before the upload is read."""
    if response_format not in FORMATS:
        raise Refused(400, "bad_request", f"response_format must be one of {', '.join(FORMATS)}, "
                      f"got {response_format!r}")
    if rates not in AUTO:
        try:
            Rates.parse(rates)
        except MavsrError as e:
            raise Refused(400, "bad_request", str(e)) from None
    if budget is not None and not budget > 0:
        raise Refused(400, "bad_request", f"budget is LLM input tokens per second of speech, > 0; got {budget:g}")
    if budget is not None and rates not in AUTO:
        raise Refused(400, "bad_request", "budget picks the rates: give one of budget and rates")
    if beam is not None and not 1 <= beam <= SERVE_MAX_BEAM:
        raise Refused(400, "bad_request", f"beam must be 1 to {SERVE_MAX_BEAM}, got {beam}")
    if (language or "").lower() not in LANGUAGES:
        raise Refused(400, "bad_request", f"language {language!r}: the model transcribes English (en)")
    if temperature not in (None, 0.0):
        raise Refused(400, "bad_request", "temperature must be 0: mavsr never samples")


def _guard(app, srv: Server):
    """ASGI middleware in front of /v1 and /metrics: the API key, checked before any body is read;
    the upload size limit, by Content-Length and while the body arrives (a chunked upload); request
    counts and latency by status."""
    limit = int(srv.opts.max_upload_mb * (1 << 20)) + (1 << 16)  # the multipart envelope on top of the file

    async def middleware(scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(("/v1/", "/metrics")):
            return await app(scope, receive, send)
        t0, status, seen, over = time.perf_counter(), [None], [0], [False]
        scope.setdefault("state", {})["arrived"] = t0

        async def counted():
            msg = await receive()
            seen[0] += len(msg.get("body", b""))
            if seen[0] > limit:
                over[0] = scope["state"]["over"] = True  # the app's 400 for the cut body is not counted
                raise _too_large(srv.opts)
            return msg

        async def sending(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        async def replaced(msg):  # the app's answer to a body cut short is replaced by the 413
            if msg["type"] == "http.response.start":
                await _refusal(srv, _too_large(srv.opts))(scope, receive, sending)

        refusal = _refused_early(srv, scope, limit)
        if refusal is not None:
            await _refusal(srv, refusal)(scope, receive, sending)
        else:
            try:
                await app(scope, counted, lambda m: replaced(m) if over[0] else sending(m))
            except Refused:  # the limit hit where nothing answered it
                if status[0] is None:
                    await _refusal(srv, _too_large(srv.opts))(scope, receive, sending)
            except Exception:  # noqa: BLE001  (answered 500 by the app's handler, which logged it)
                if status[0] is None:
                    await _refusal(srv, Refused(500, "internal", "internal error"))(scope, receive, sending)
        if scope["path"].startswith("/v1/"):
            srv.metrics.requests.labels(str(status[0])).inc()
            if status[0] == 200:
                srv.metrics.latency.observe(time.perf_counter() - t0)

    return middleware


def _refused_early(srv: Server, scope: dict, limit: int) -> Refused | None:
    """Before any body is read: the key, the declared size, and (for uploads) a full queue."""
    headers, key = dict(scope["headers"]), srv.opts.api_key
    if key and not hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {key}".encode()):
        return Refused(401, "unauthorized", "a valid 'Authorization: Bearer <key>' header is needed",
                       {"WWW-Authenticate": "Bearer"})
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return _too_large(srv.opts)
    if scope["path"].startswith("/v1/") and scope["method"] == "POST":
        try:
            srv.check_room()
        except Refused as e:
            return e
    return None


def _refusal(srv: Server, e: Refused) -> JSONResponse:
    srv.metrics.errors.labels(e.kind).inc()
    return JSONResponse(error_body(e.kind, e.message), status_code=e.status, headers=e.headers)


def _response(done, job: Job, fmt: str, timings: dict):
    e = job.engine
    body = {"text": done.text, "experiment": e.name, "rates": done.rates.tag, "pair": done.rates.pair,
            "beam": job.beam, "tokens_in": done.tokens_in, "duration": round(job.clip.duration, 3),
            "batch": done.batch, "timings": {k: round(v, 4) for k, v in timings.items()}}
    if job.clip.mouth:
        body["mouth"] = job.clip.mouth
    if fmt == "text":
        return PlainTextResponse(done.text + "\n", headers={"X-Mavsr-Rates": done.rates.tag,
                                                            "X-Mavsr-Tokens-In": str(done.tokens_in)})
    if fmt == "verbose_json":
        body = {"task": "transcribe", "language": "english", **body}
    return JSONResponse(body)


def create_app(srv: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await srv.start()
        yield
        await srv.stop()

    app = FastAPI(title="mavsr", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Refused)
    async def refused(request, e: Refused):
        return _refusal(srv, e)

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):  # a bug or a failed decode: one line to the client, the trace here
        srv.log("serve: error: " + "".join(traceback.format_exception(e)).rstrip())
        return _refusal(srv, Refused(500, "internal", f"internal error ({type(e).__name__}); the server log has it"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):  # 404, 405, a body that does not parse
        if request.scope.get("state", {}).get("over"):  # replaced by the 413 on its way out
            return JSONResponse(error_body("too_large", ""), status_code=413)
        return _refusal(srv, Refused(e.status_code, "bad_request", str(e.detail), dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        return _refusal(srv, Refused(400, "bad_request", f"{where}: {err.get('msg', 'invalid')}"))

    @app.get("/healthz")
    async def healthz():
        exps = [{"name": e.name, "modality": e.modality, "rates": [r.tag for r in e.pairs], "beam": e.beam}
                for e in srv.engines]
        return {"status": "ok", "experiments": exps,
                "rates": srv.opts.rates, "slo_ms": srv.opts.slo_ms, "queue": srv.batcher.queued}

    @app.get("/metrics")
    async def metrics():
        srv.metrics.queue.set(srv.batcher.queued)
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request, file: UploadFile = File(...), model: str | None = Form(None),
                             rates: str | None = Form(None), budget: float | None = Form(None),
                             beam: int | None = Form(None), response_format: str = Form("json"),
                             language: str | None = Form(None), prompt: str | None = Form(None),
                             temperature: float | None = Form(None)):
        check_form(rates, budget, beam, response_format, language, temperature)
        arrived = request.scope.get("state", {}).get("arrived", time.perf_counter())
        form = {"rates": rates, "budget": budget, "beam": beam, "arrived": arrived}
        with srv.metrics.in_flight.track_inprogress():
            job, done, timings = await _admitted(srv, file, form)
        return _response(done, job, response_format, timings)

    return _guard(app, srv)


async def _admitted(srv: Server, file: UploadFile, form: dict) -> tuple[Job, Done, dict]:
    """Admit, save, read and encode (prep thread), decode in a batch; the upload is removed either way."""
    srv.admit()
    loop = asyncio.get_running_loop()
    try:
        try:
            path = await srv.save(file)
            try:
                job = await loop.run_in_executor(srv.prep, srv.prepare, path, "the upload", form)
            finally:
                path.unlink(missing_ok=True)
            if job.clip is None:  # an experiment that batches its encoder: with the others read by then
                await srv.encode(job)
            t1 = time.perf_counter()
            srv.batcher.observe_prep(job.encode_seconds)  # its own work, not its wait for the prep thread
        finally:
            srv.batcher.preparing -= 1
        done = await srv.batcher.submit(job)
    finally:
        srv.admitted -= 1
        srv.metrics.queue.set(srv.batcher.queued)
    t2 = time.perf_counter()
    return job, done, {"encode": job.encode_seconds, "queue": done.started - t1, "decode": done.seconds,
                 "total": t2 - form["arrived"]}
