"""Stage `extract-features`: manifests -> native-rate encoder features (see features.py).

    reads  data/<split>/manifest.jsonl and its media; the encoders named in the config
    writes dump/<encoders-tag>/<split>/{shard-*.safetensors, index.jsonl, provenance.json,
           config.yaml, cmd.txt, .done}
Shards are written atomically one by one; a rerun reuses finished shards (resume) and skips a
finished split. A cache whose provenance names other encoders is refused, not reused.
Device: the encoders run where `--device` says (auto: a GPU when torch sees one, else the CPU);
features are stored from the CPU in fp16, and each shard file and the split's provenance.json
record the device type that computed them (a GPU's low bits differ from the CPU's).
Scale-out: `--shard i/N` computes only every N-th shard file (i, i+N, ...), so N processes on N
GPUs (CUDA_VISIBLE_DEVICES=i each) or nodes split a corpus into the same dump dir; a run without
--shard then merges them (it reuses every finished shard, computes any missing one, and writes
the index and `.done`).
Augmentation (augment.noisy_copies K > 0): the train split also holds K seeded copies of every
utterance, babble-noised at a drawn SNR and with a random mouth crop, encoded like the original;
training reads, per utterance and epoch, the original or one copy, drawn uniformly (train_loop.py).
"""

from __future__ import annotations

from ..config import Config
from ..errors import MavsrError
from ..extraction import extract
from ..options import DEVICE, SHARD_SIZE
from ..recipe import Recipe
from ..sharding import Shard


def run(recipe: Recipe, cfg: Config, splits: list[str] | None, force: bool = False, log=print,
        shard: Shard | None = None, shard_size: int = SHARD_SIZE, device: str = DEVICE) -> str:
    """Extract the splits (None: every prepared one) into dump/<encoders-tag>/; returns the tag."""
    splits = splits or recipe.prepared_splits()
    if not splits:
        raise MavsrError(f"no prepared splits in {recipe.root / 'data'}: run `mavsr prepare` first")
    return extract(recipe, cfg, splits, force, log, shard, shard_size, device=device)
