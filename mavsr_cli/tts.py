"""espeak-ng speech synthesis through ctypes, with word and phoneme timings.

The shared library and its data come from the `espeakng-loader` wheel, so no system package is
needed. Only the documented C API of `speak_lib.h` is used: espeak_Initialize (synchronous mode,
phoneme events on), espeak_SetVoiceByName, espeak_SetParameter, espeak_SetSynthCallback and
espeak_Synth, plus espeak_ng_SetRandSeed from `espeak_ng.h`. WORD and PHONEME events carry their
position in the audio (milliseconds), which is what the synthetic lip renderer needs.

espeak-ng keeps global state; calls are serialised inside one process by a lock.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
_PARAM_RATE = 1
_PARAM_PITCH = 3
_PARAM_RANGE = 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds from the start of the text
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Phone:
    """One phoneme of the synthesized utterance (espeak mnemonic) with its start time."""

    symbol: str
    start: float  # seconds


@dataclass(frozen=True)
class WordTiming:
    text_position: int  # 1-based character offset of the word in the input text
    start: float  # seconds


@dataclass(frozen=True)
class Speech:
    audio: np.ndarray  # (T,) float32 in [-1, 1]
    sample_rate: int
    phones: list[Phone]
    words: list[WordTiming]


class Espeak:
    """A process-wide espeak-ng engine. Create with `Espeak.get()`."""

    _instance: Espeak | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - dependency of the package
            raise RuntimeError("espeak-ng is unavailable: install the 'espeakng-loader' wheel") from e
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib = self._lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        # espeak_ng.h: the seed of the engine's own random numbers (some voice variants add random
        # breath and jitter); espeak_Initialize seeds it from the clock, so it is reset before each
        # utterance. Older libraries without it are used as they are.
        self._seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._seed is not None:
            self._seed.argtypes, self._seed.restype = [ctypes.c_long], None
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        data = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INIT_PHONEME_EVENTS)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (code {rate})")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, str]] = []
        self._callback = _CALLBACK(self._on_audio)  # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> Espeak:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_audio(self, wav, n, events) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                sym = bytes(ev.id.string).split(b"\0")[0].decode("ascii", "replace")
                self._events.append((_EVENT_PHONEME, ev.audio_position, ev.text_position, sym))
            elif ev.type == _EVENT_WORD:
                self._events.append((_EVENT_WORD, ev.audio_position, ev.text_position, ""))
            i += 1
        return 0  # continue synthesis

    def say(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50,
            pitch_range: int = 50) -> Speech:
        """Synthesize `text` in this process; rate in words per minute, pitch and range 0-100.

        espeak-ng carries internal state (pitch flutter and the like) from one utterance to the next,
        so the result depends on what was synthesized before: use `say_isolated` for reproducible
        output.
        """
        with self._lock:
            lib = self._lib
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
            lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            lib.espeak_SetParameter(_PARAM_RANGE, int(pitch_range), 0)
            if self._seed is not None:
                self._seed(0)
            self._chunks, self._events = [], []
            buf = ctypes.create_string_buffer(text.encode("utf-8"))
            err = lib.espeak_Synth(buf, len(buf), 0, 0, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed (code {err})")
            pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            events = list(self._events)
        audio = pcm.astype(np.float32) / 32768.0
        phones = [Phone(sym, pos / 1000.0) for kind, pos, _, sym in events if kind == _EVENT_PHONEME]
        words = [WordTiming(tp, pos / 1000.0) for kind, pos, tp, _ in events if kind == _EVENT_WORD]
        return Speech(audio, self.sample_rate, phones, words)

    def say_isolated(self, text: str, **kw) -> Speech:
        """Synthesize in a forked child, so the engine's state is the same pristine one every time:
        the same arguments always give the same samples, whatever was synthesized before with
        `say_isolated` (a `say` in this process does change the state its children start from)."""
        import os
        import pickle

        if not hasattr(os, "fork"):  # pragma: no cover - Windows: best effort
            return self.say(text, **kw)
        with self._lock:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: synthesize, send, exit without running Python cleanup
                code = 0
                try:
                    os.close(r)
                    self._lock = threading.Lock()
                    try:
                        payload = ("ok", self.say(text, **kw))
                    except Exception as e:  # noqa: BLE001 - sent back to the parent
                        payload = ("error", e)
                    with os.fdopen(w, "wb") as f:
                        pickle.dump(payload, f)
                except BaseException:
                    code = 1
                os._exit(code)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                data = f.read()
            _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise RuntimeError(f"espeak-ng synthesis process failed (status {status})")
        kind, value = pickle.loads(data)
        if kind == "error":
            raise value
        return value
