"""The Matryoshka training loop (paper.md, "Matryoshka training").

Every batch: load the native-rate features once (the cache stands in for "encode once"), then for
each rate configuration of the grid compress, project and run the LLM, and average the losses
with equal weights. With one shared LoRA (MS) the configurations are packed into one batched LLM
pass (`train.pack_rates`): the same losses, but on CPU it measured slower (0.35 vs 0.24 s per
step on the synthetic recipe) because every configuration is padded to the longest one.
AdamW (0.9, 0.98), weight decay 0.1, cosine decay without warm-up, gradient clipping at 10: the
reference code's recipe. fp32 on CPU.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from . import checkpoint
from .config import Config
from .features import FeatureStore, pad_batch
from .progress import bar
from .rates import Rates


def batch_features(store: FeatureStore, ids: list[str], modality: str) -> dict:
    feats = {}
    for m in ("audio", "video"):
        if (m == "audio" and modality in ("av", "a")) or (m == "video" and modality in ("av", "v")):
            feats[m] = pad_batch([store.get(i, m) for i in ids])  # (B, T, D), (B,)
    return feats


def lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * p))
    return f


def train(model, store: FeatureStore, texts: dict[str, str], cfg: Config, rates: list[Rates], exp: Path,
          meta: dict, log) -> Path:
    t = cfg.train
    tok = model.tokenizer
    ids = store.ids()
    targets = {i: tok(texts[i], add_special_tokens=False).input_ids for i in ids}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    steps_per_epoch = math.ceil(len(ids) / t.batch_size)
    total = t.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, t.warmup_steps))
    start_epoch = 0
    ckpts = checkpoint.list_checkpoints(exp / "ckpt")
    if ckpts and (ckpts[-1] / "trainer.pt").is_file():  # resume at the last finished epoch
        model.load_trainable(checkpoint.load_state(ckpts[-1]))
        tr = torch.load(ckpts[-1] / "trainer.pt", weights_only=True)
        opt.load_state_dict(tr["optimizer"])
        sched.load_state_dict(tr["scheduler"])
        start_epoch = tr["epoch"] + 1
        log(f"train: resuming from {ckpts[-1].name} (epoch {start_epoch + 1} of {t.epochs})")
    metrics = open(exp / "metrics.jsonl", "a")
    step = start_epoch * steps_per_epoch
    last = ckpts[-1] if ckpts else None
    model.train()
    with bar() as pbar:
        task = pbar.add_task("train", total=total, completed=step, info="")
        for epoch in range(start_epoch, t.epochs):
            g = torch.Generator().manual_seed(t.seed * 1000 + epoch)
            order = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
            t0, n_tok = time.time(), 0
            for b in range(0, len(order), t.batch_size):
                bid = order[b:b + t.batch_size]
                feats = batch_features(store, bid, cfg.model.modality)
                tg = [targets[i] for i in bid]
                if cfg.train.pack_rates:  # one LLM pass for every configuration (MS shares its adapter)
                    losses = model.losses_packed(feats, rates, tg)
                else:  # one LLM pass per configuration
                    losses = [model.loss(feats, r, tg) for r in rates]
                loss = torch.stack(losses).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                opt.step()
                sched.step()
                step += 1
                n_tok += sum(len(x) + 1 for x in tg)
                rec = {"step": step, "epoch": epoch + 1, "loss": round(loss.item(), 5),
                       "lr": sched.get_last_lr()[0],
                       "loss_per_rate": {r.tag: round(v.item(), 5) for r, v in zip(rates, losses, strict=True)}}
                metrics.write(json.dumps(rec) + "\n")
                pbar.update(task, advance=1, info=f"epoch {epoch + 1} loss {loss.item():.3f}")
                if step % t.log_every == 0 or step == total:
                    log(f"step {step}/{total} epoch {epoch + 1} loss {loss.item():.4f} "
                        + " ".join(f"{k}={v:.3f}" for k, v in rec["loss_per_rate"].items())
                        + f" lr {rec['lr']:.2e}")
            metrics.flush()
            el = time.time() - t0
            log(f"epoch {epoch + 1} done in {el:.1f}s ({n_tok / el:.0f} target tokens/s)")
            trainer = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch}
            last = checkpoint.save(exp / "ckpt", step, model.trainable_state(), {**meta, "step": step, "epoch": epoch + 1},
                                   trainer, t.keep_checkpoints)
    metrics.close()
    model.eval()
    return last
