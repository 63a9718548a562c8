"""Stage `decode`: a trained experiment + cached features -> hypotheses at one rate pair (or all).

    reads  exp/<tag>/{config.yaml, meta.json, ckpt/*/}, dump/<encoders-tag>/<split>[-<condition>]/,
           data/<split>/manifest.jsonl
    writes exp/<tag>/decode_<rates>[_pool<rates>]_beam<B>[_<condition>]/<split>/{hyp.jsonl, config.yaml,
           cmd.txt, .done}   (the name: rates.DecodeTag)
Greedy or mavsr's batched beam search with a KV cache (decoding.py), never sampling: a rerun,
and any batch size, give the same hypotheses. Rates outside the checkpoint's trained grid are
refused before any work. A noisy condition (`--snr`, `--noise`) encodes the split once more with
noise seeded per utterance into its own cache. `--shard i/N` decodes every N-th batch into a part
file; a run without it merges the parts (computing any missing ones).
"""

from __future__ import annotations

from pathlib import Path

from ..decoding import Decoder
from ..errors import MavsrError
from ..options import DEVICE
from ..rates import Rates
from ..recipe import Recipe
from ..sharding import Shard


def run(recipe: Recipe, exp: Path, split: str, audio_rate: int | None, video_rate: int | None, force: bool = False,
        log=print, shard: Shard | None = None, sweep: bool = False, budget: float | None = None,
        device: str = DEVICE, **overrides) -> list[Path]:
    """Decode at one rate pair, at every trained pair (`sweep`), or at the best pair within `budget`.

    `overrides`: fields of the config's `decode:` section for this call (beam, batch_size,
    max_new_tokens, snr, noise, pool); None keeps the config's value. `pool` (a rate tag, e.g.
    a16v5): inference-only pooling, the paper's baseline: features are compressed at these rates
    but go through the projectors (and adapters) of the decoded pair, typically a model trained
    at rate 1 decoded at rates it never saw. `device`: where the model runs (devices.resolve)."""
    dec = Decoder(recipe, exp, split, log, device)
    opts = dec.options(**overrides)
    if overrides.get("noise") is not None and opts.snr is None:
        raise MavsrError(f"--noise {overrides['noise']} is the noise of a --snr condition; give --snr too")
    if opts.pool:
        _check_pool(dec, Rates.parse(opts.pool), audio_rate, video_rate, sweep or budget is not None)
    if sweep:
        if audio_rate is not None or video_rate is not None or budget is not None:
            raise MavsrError("--sweep decodes every trained configuration; drop --audio-rate/--video-rate/--budget")
        chosen = list(dec.trained)
    else:
        r = dec.requested_rates(audio_rate, video_rate, budget)
        if r is None:
            raise MavsrError(f"give --audio-rate and/or --video-rate (or --sweep, --budget); trained grid: "
                             f"{', '.join(x.tag for x in dec.trained)}")
        chosen = [r]
    return [dec.run(r, opts, force, shard) for r in chosen]


def _check_pool(dec: Decoder, pool: Rates, audio_rate: int | None, video_rate: int | None, many: bool) -> None:
    if many:
        raise MavsrError("--pool-rates goes with one pair (--audio-rate/--video-rate), not --sweep or --budget")
    if dec.cfg.model.compression != "avg":
        raise MavsrError(f"--pool-rates needs average pooling; this model compresses by {dec.cfg.model.compression!r}, "
                         "which changes the projector's input width")
    if (pool.audio is None) != (audio_rate is None) or (pool.video is None) != (video_rate is None):
        raise MavsrError(f"--pool-rates {pool.tag} must name the same modalities as the decoded pair")
