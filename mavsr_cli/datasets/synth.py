"""The synthetic audio-visual corpus: license-free, deterministic from a seed, CPU-cheap.

Sentences come from a seeded grammar over a few hundred words. Speech is espeak-ng (several
voices, rates and pitches make the speakers). Lips are rendered at 25 fps from espeak's phoneme
timeline through a viseme table (mouth opening, width, rounding, teeth and tongue visibility),
with per-speaker face geometry, head motion, lighting and sensor noise, so the video carries part,
not all, of the content (as real lips do).

The corpus is written as an LRS3 tree, `<root>/{trainval,test}/<speaker>/<utt>.{mp4,txt,pkl}`:
full-frame 224x224 face video with the audio in the mp4, `Text:` files with word timings, and
68-point landmark pickles (formats.md). The mouth is rendered from visemes, pasted into a drawn
face in a reference frame, and the face is moved per frame by a similarity transform (per-speaker
pose plus head motion); the landmarks are the reference template moved the same way, with
detector jitter and a few frames without a face. `mavsr prepare lrs3` then recovers the mouth
ROI exactly as it does for real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import compat
from ..clocks import FPS, SAMPLE_RATE

# --------------------------------------------------------------------------------------------
# Grammar: every sentence is a path through one of the templates; slots draw from word lists.
WORDS = {  # slot -> its words, in the order `words_per_slot` cuts them (one phrase per comma in "time")
    "name": """
        anna ben carla david emma frank grace henry iris jack kate leo maria nora oscar paul rosa sam tina
        victor wendy alex bella chris diana ethan fiona george hannah ivan
    """.split(),
    "noun": """
        apple table window garden river engine ticket letter camera basket candle pencil bottle jacket
        mirror ladder blanket guitar rocket hammer pillow carpet wallet bucket button castle dragon forest
        island jungle lemon market needle orange parrot puzzle rabbit saddle tomato violin wagon yogurt
        zipper anchor barrel cactus donkey feather helmet kettle lantern magnet napkin oven pepper quilt
        ribbon spoon tunnel umbrella velvet whistle compass teapot pumpkin
    """.split(),
    "adj": """
        big small red green blue yellow purple silver golden wooden heavy light bright dark quiet noisy
        happy sleepy shiny dusty broken ancient modern tiny huge soft rough warm cold clean muddy
    """.split(),
    "verb_past": """
        found moved painted lifted dropped cleaned opened carried washed bought sold fixed packed pushed
        pulled hid kicked caught threw borrowed
    """.split(),
    "verb": """
        find move paint lift drop clean open carry wash buy sell fix pack push pull hide kick catch throw
        borrow
    """.split(),
    "prep": """
        near under behind beside above inside below
    """.split(),
    "place": ["the " + w for w in """
        kitchen station library garage school harbor office bakery museum hotel bridge farm
    """.split()],
    "number": """
        one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred
    """.split(),
    "adverb": """
        slowly quickly carefully quietly happily gently badly early later today yesterday again
    """.split(),
    "time": [w.strip() for w in """
        on monday, on tuesday, on friday, at noon, at night, in the morning, in the evening, after lunch,
        before dinner
    """.split(",")],
}

TEMPLATES = [
    "{name} {verb_past} the {adj} {noun} {prep} {place}",
    "please {verb} the {adj} {noun} {adverb}",
    "{name} and {name} {verb_past} {number} {adj} {noun}s {time}",
    "the {noun} is {prep} the {adj} {noun}",
    "can you {verb} the {noun} {prep} {place} {time}",
    "{name} {adverb} {verb_past} a {adj} {noun}",
    "put {number} {noun}s {prep} the {noun} {adverb}",
    "we {verb_past} the {adj} {adj} {noun} {time}",
]


def sentence(rng: np.random.Generator, words_per_slot: int = 0) -> str:
    """One sentence of the grammar; `words_per_slot` > 0 draws each slot from its first that many
    words only (a smaller vocabulary: the reduced study's corpus)."""
    tmpl = TEMPLATES[rng.integers(len(TEMPLATES))]
    out, i = [], 0
    while i < len(tmpl):
        j = tmpl.find("{", i)
        if j < 0:
            out.append(tmpl[i:])
            break
        out.append(tmpl[i:j])
        k = tmpl.index("}", j)
        words = WORDS[tmpl[j + 1:k]]
        if words_per_slot > 0:
            words = words[:words_per_slot]
        out.append(words[rng.integers(len(words))])
        i = k + 1
    return " ".join("".join(out).split())


def vocabulary(words_per_slot: int = 0) -> list[str]:
    """Every word the grammar can produce (including plural nouns); with `words_per_slot` > 0,
    every word `sentence(rng, words_per_slot)` can produce."""
    words = set()
    for tmpl in TEMPLATES:
        words.update(w for w in tmpl.replace("{", " {").split() if not w.startswith("{"))
    for k, ws in WORDS.items():
        for w in ws[:words_per_slot] if words_per_slot > 0 else ws:
            words.update(w.split())
            if k == "noun":
                words.add(w + "s")
    return sorted(words)


# --------------------------------------------------------------------------------------------
# Speakers: a voice and a face. Derived deterministically from (seed, index).
VOICES = ["en-us", "en", "en-029", "en-gb-x-rp"]
VARIANTS = ["", "+m1", "+m3", "+f2", "+f3", "+m7", "+f4", "+m2"]


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str  # espeak voice name with variant
    rate: int  # words per minute
    pitch: int  # 0-100
    pitch_range: int  # 0-100
    skin: float  # face brightness 0-1
    lip: float  # lip brightness relative to skin
    mouth_w: float  # mouth half-width at rest, pixels
    mouth_h: float  # maximum mouth half-opening, pixels
    cx: float  # mouth centre x offset, pixels
    cy: float  # mouth centre y offset, pixels
    motion: float  # head motion amplitude, pixels
    noise: float  # sensor noise std (0-255 scale)
    light: float  # left-right lighting gradient
    face_scale: float = 0.9  # size of the face in the full frame, relative to the reference face
    face_angle: float = 0.0  # head roll, degrees
    face_dx: float = 0.0  # face position offset in the full frame, pixels
    face_dy: float = 0.0


def make_speaker(seed: int, index: int) -> Speaker:
    r = np.random.default_rng([seed, 1000 + index])
    return Speaker(
        id=f"spk{index:02d}",
        voice=VOICES[index % len(VOICES)] + VARIANTS[(index // len(VOICES) + index) % len(VARIANTS)],
        rate=int(r.integers(140, 200)),
        pitch=int(r.integers(25, 75)),
        pitch_range=int(r.integers(30, 80)),
        skin=float(r.uniform(0.45, 0.8)),
        lip=float(r.uniform(0.55, 0.8)),
        mouth_w=float(r.uniform(18, 26)),
        mouth_h=float(r.uniform(12, 18)),
        cx=float(r.uniform(-4, 4)),
        cy=float(r.uniform(-4, 4)),
        motion=float(r.uniform(0.5, 3.0)),
        noise=float(r.uniform(2.0, 8.0)),
        light=float(r.uniform(-0.15, 0.15)),
        face_scale=float(r.uniform(0.82, 0.95)),
        face_angle=float(r.uniform(-6, 6)),
        face_dx=float(r.uniform(-8, 8)),
        face_dy=float(r.uniform(-8, 8)),
    )


# --------------------------------------------------------------------------------------------
# Visemes: espeak phoneme mnemonic -> (open, width, round, teeth, tongue), each 0..1.
_V = {
    "p": (0.0, 0.5, 0.2, 0.0, 0.0), "b": (0.0, 0.5, 0.2, 0.0, 0.0), "m": (0.0, 0.5, 0.2, 0.0, 0.0),
    "f": (0.1, 0.55, 0.0, 1.0, 0.0), "v": (0.1, 0.55, 0.0, 1.0, 0.0),
    "T": (0.2, 0.6, 0.0, 0.6, 1.0), "D": (0.2, 0.6, 0.0, 0.6, 1.0),
    "s": (0.15, 0.7, 0.0, 0.9, 0.0), "z": (0.15, 0.7, 0.0, 0.9, 0.0),
    "t": (0.25, 0.6, 0.0, 0.5, 0.6), "d": (0.25, 0.6, 0.0, 0.5, 0.6),
    "n": (0.25, 0.6, 0.0, 0.4, 0.6), "l": (0.3, 0.6, 0.0, 0.4, 0.9),
    "S": (0.25, 0.45, 0.7, 0.7, 0.0), "Z": (0.25, 0.45, 0.7, 0.7, 0.0),
    "tS": (0.25, 0.45, 0.7, 0.7, 0.0), "dZ": (0.25, 0.45, 0.7, 0.7, 0.0),
    "k": (0.35, 0.55, 0.0, 0.2, 0.0), "g": (0.35, 0.55, 0.0, 0.2, 0.0), "N": (0.3, 0.55, 0.0, 0.2, 0.0),
    "h": (0.45, 0.55, 0.0, 0.1, 0.0), "r": (0.25, 0.45, 0.5, 0.3, 0.2),
    "w": (0.15, 0.3, 1.0, 0.0, 0.0), "j": (0.2, 0.75, 0.0, 0.5, 0.0),
    "a": (0.9, 0.6, 0.0, 0.3, 0.3), "A": (0.95, 0.55, 0.1, 0.2, 0.2),
    "E": (0.6, 0.7, 0.0, 0.5, 0.2), "e": (0.55, 0.75, 0.0, 0.5, 0.2),
    "I": (0.35, 0.85, 0.0, 0.6, 0.1), "i": (0.3, 0.9, 0.0, 0.7, 0.1),
    "0": (0.7, 0.4, 0.7, 0.1, 0.1), "O": (0.65, 0.35, 0.8, 0.1, 0.1), "o": (0.5, 0.35, 0.85, 0.1, 0.1),
    "U": (0.3, 0.35, 0.85, 0.1, 0.0), "u": (0.25, 0.3, 0.95, 0.0, 0.0),
    "@": (0.45, 0.55, 0.0, 0.3, 0.1), "3": (0.4, 0.5, 0.3, 0.3, 0.1), "V": (0.55, 0.55, 0.0, 0.3, 0.1),
}
_REST = (0.05, 0.5, 0.1, 0.0, 0.0)


def viseme(symbol: str) -> tuple[float, float, float, float, float]:
    s = symbol.lstrip("',")
    if s in _V:
        return _V[s]
    if s[:2] in _V:
        return _V[s[:2]]
    if s[:1] in _V:
        return _V[s[:1]]
    return _REST  # pauses (_, _:) and anything unknown


def lip_track(phones, num_frames: int, fps: int = FPS) -> np.ndarray:
    """Per-frame viseme parameters (T, 5): hold each phone's target, then smooth (coarticulation)."""
    hi = 200  # internal resolution, Hz
    n = int(np.ceil(num_frames / fps * hi)) + 1
    track = np.tile(np.array(_REST, np.float32), (n, 1))
    for i, ph in enumerate(phones):
        start = int(ph.start * hi)
        end = int(phones[i + 1].start * hi) if i + 1 < len(phones) else n
        track[max(start, 0):max(min(end, n), 0)] = viseme(ph.symbol)
    k = int(0.06 * hi)  # 60 ms moving average
    kernel = np.ones(k, np.float32) / k
    smooth = np.stack([np.convolve(np.pad(track[:, j], (k // 2, k - k // 2 - 1), mode="edge"),
                                   kernel, mode="valid") for j in range(5)], 1)
    at = ((np.arange(num_frames) + 0.5) / fps * hi).astype(int).clip(0, n - 1)
    return smooth[at]


def render(track: np.ndarray, spk: Speaker, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """Draw the mouth ROI for each frame: (T, size, size) uint8 grayscale."""
    t_n = len(track)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = spk.skin * (1 + spk.light * (xx - size / 2) / (size / 2))  # lighting gradient
    phase = rng.uniform(0, 2 * np.pi, 2)
    frames = np.empty((t_n, size, size), np.float32)
    for i, (op, wd, rd, teeth, tongue) in enumerate(track):
        dx = spk.motion * np.sin(2 * np.pi * i / 47 + phase[0])
        dy = spk.motion * 0.6 * np.sin(2 * np.pi * i / 61 + phase[1])
        cx, cy = size / 2 + spk.cx + dx, size / 2 + 8 + spk.cy + dy
        hw = spk.mouth_w * (0.7 + 0.6 * wd) * (1 - 0.35 * rd)  # half-width
        ho = 1.0 + spk.mouth_h * op  # half-opening
        img = base.copy()
        # lips: an ellipse a little larger than the opening
        lips = ((xx - cx) / (hw + 4)) ** 2 + ((yy - cy) / (ho + 4 + 3 * rd)) ** 2 <= 1
        img[lips] = spk.skin * spk.lip
        # inner mouth: dark cavity
        inner = ((xx - cx) / hw) ** 2 + ((yy - cy) / ho) ** 2 <= 1
        img[inner] = 0.08
        # upper teeth: a bright band at the top of the opening
        if teeth > 0.05:
            band = inner & (yy < cy - ho + 1 + 4 * teeth)
            img[band] = 0.85
        # tongue: a lighter blob at the bottom of the cavity
        if tongue > 0.05:
            tb = inner & (((xx - cx) / (0.6 * hw)) ** 2 + ((yy - cy - 0.5 * ho) / (0.5 * ho + 1)) ** 2 <= tongue)
            img[tb] = 0.45
        frames[i] = img
    frames = frames * 255 + rng.normal(0, spk.noise, frames.shape)
    return frames.clip(0, 255).astype(np.uint8)


FACE_SIZE = 224  # full-frame video size, as LRS3's


def _face_canvas(spk: Speaker) -> np.ndarray:
    """The speaker's reference-frame (256x256) face without a mouth: head, eyes, brows, nose.
    float32 in 0..255; each frame pastes its mouth ROI at the template's mouth (FACE_MOUTH)."""
    from ..roi import REF_SIZE

    yy, xx = np.mgrid[0:REF_SIZE, 0:REF_SIZE].astype(np.float32)
    img = np.full((REF_SIZE, REF_SIZE), 60.0, np.float32)
    head = ((xx - 128) / 96) ** 2 + ((yy - 140) / 122) ** 2 <= 1
    img[head] = 255 * spk.skin
    for ex in (88, 168):
        img[((xx - ex) / 13) ** 2 + ((yy - 107) / 5) ** 2 <= 1] = 30
        img[((xx - ex) / 20) ** 2 + ((yy - 86) / 3) ** 2 <= 1] = 255 * spk.skin * 0.5
    img[((xx - 128) / 9) ** 2 + ((yy - 135) / 22) ** 2 <= 1] = 255 * spk.skin * 0.85
    return img


FACE_MOUTH = (slice(138, 234), slice(80, 176))  # where the 96x96 mouth ROI sits in the reference face


def face_video(rois: np.ndarray, spk: Speaker, rng: np.random.Generator, size: int = FACE_SIZE):
    """Mouth ROIs (T, 96, 96) -> full-frame face video (T, size, size) uint8 and per-frame 68-point
    landmarks (a few frames None, as a detector would miss them)."""
    from ..roi import default_mean_face

    t_n = len(rois)
    ref = default_mean_face()
    phase = rng.uniform(0, 2 * np.pi, 3)
    canvases = np.repeat(_face_canvas(spk)[None], t_n, 0)
    canvases[(slice(None), *FACE_MOUTH)] = rois
    # per frame: a small rotation and drift of the head; the landmarks follow it (with detector jitter)
    invs, ts, lms = np.empty((t_n, 2, 2)), np.empty((t_n, 2)), []
    for i in range(t_n):
        ang = np.deg2rad(spk.face_angle + 1.5 * np.sin(2 * np.pi * i / 53 + phase[0]))
        sc = spk.face_scale * 0.78
        r = sc * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        t = np.array([size / 2 + spk.face_dx + spk.motion * np.sin(2 * np.pi * i / 41 + phase[1]),
                      size / 2 + spk.face_dy + spk.motion * np.sin(2 * np.pi * i / 59 + phase[2])]) - r @ [128, 140]
        lm = ref @ r.T + t + rng.normal(0, 0.3, ref.shape)
        lms.append(None if rng.random() < 0.02 else lm.astype(np.float32))
        invs[i], ts[i] = np.linalg.inv(r), t
    # output pixel -> reference-frame pixel, then to grid_sample's -1..1
    # (computed in float64, stored as float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    grid = np.empty((t_n, size, size, 2), np.float32)
    for i in range(t_n):
        dx, dy = xs - ts[i, 0], ys - ts[i, 1]
        grid[i, ..., 0] = (dx * invs[i, 0, 0] + dy * invs[i, 0, 1] + 0.5) / 128 - 1
        grid[i, ..., 1] = (dx * invs[i, 1, 0] + dy * invs[i, 1, 1] + 0.5) / 128 - 1
    out = torch.nn.functional.grid_sample(torch.from_numpy(canvases)[:, None], torch.from_numpy(grid), mode="bilinear",
                                          padding_mode="border", align_corners=False)
    frames = out[:, 0].numpy() + rng.normal(0, 1.5, (t_n, size, size))
    return frames.clip(0, 255).astype(np.uint8), lms


@dataclass(frozen=True)
class SynthUtterance:
    frames: np.ndarray  # (T, 96, 96) uint8
    audio: np.ndarray  # (T * 640,) float32, 16 kHz
    text: str
    words: list[tuple[str, float, float]]  # (word, start s, end s)


def synthesize(text: str, spk: Speaker, rng: np.random.Generator) -> SynthUtterance:
    from ..tts import Espeak

    speech = Espeak.get().say_isolated(text, voice=spk.voice, rate=spk.rate, pitch=spk.pitch,
                              pitch_range=spk.pitch_range)
    wav = torch.from_numpy(speech.audio)[None]
    audio = compat.resample(wav, speech.sample_rate, SAMPLE_RATE)[0].numpy()
    spf = SAMPLE_RATE // FPS  # 640 samples per video frame (docs/method.md, training recipe)
    num_frames = max(1, int(np.ceil(len(audio) / spf)))
    audio = np.pad(audio, (0, num_frames * spf - len(audio)))
    audio = audio + rng.normal(0, 1e-3, audio.shape).astype(np.float32)  # recording noise floor
    frames = render(lip_track(speech.phones, num_frames), spk, rng)
    # word timings: WORD events give starts; a word ends where the next begins
    tokens = text.split()
    starts = [w.start for w in speech.words][: len(tokens)]
    while len(starts) < len(tokens):
        starts.append(starts[-1] if starts else 0.0)
    dur = num_frames / FPS
    ends = starts[1:] + [dur]  # each word lasts until the next one starts
    words = list(zip(tokens, starts, ends, strict=True))
    return SynthUtterance(frames, audio.astype(np.float32), text, words)
