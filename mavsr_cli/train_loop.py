"""The Matryoshka training loop (paper.md, "Matryoshka training").

Every step: load the native-rate features of a batch once (the cache stands in for "encode once"),
then for each rate configuration of the grid compress, project and run the LLM, and average the
losses with equal weights. With one shared LoRA (MS) the configurations can be packed into one
batched LLM pass (`train.pack_rates`): the same losses and gradients.

Optimisation is the reference code's: AdamW (0.9, 0.98), weight decay 0.1, cosine decay without
warm-up, gradient clipping at 10. The loss of a step is normalised by the target-token count of
the whole global batch, so gradient accumulation and N processes give the gradient of one batch.

Scale: under `torchrun` the loop runs PyTorch DDP (gloo on CPU, NCCL on GPU) or FSDP; each process
takes its share of every global batch. bf16 autocast on GPU, fp32 on CPU.

Determinism and resume: batches are planned from (seed, epoch), and every step reseeds the RNGs
from (seed, step, rank), so a run resumed from a step checkpoint continues exactly as if it had
never stopped (same losses, same weights, on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from . import augment, checkpoint, faults, seeds
from .config import Config
from .errors import MavsrError
from .features import FeatureStore, batch_features
from .progress import bar
from .rates import Rates

FAULT_ENV = faults.KILL_AT_STEP  # testing aid: SIGKILL the run right after this step's checkpoint


def lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * p))
    return f


def plan_epoch(store: FeatureStore, ids: list[str], batch_size: int, max_frames: int, seed: int, epoch: int,
               min_batch: int = 1) -> list[list[str]]:
    """The global batches of one epoch, a function of (seed, epoch) only.

    max_frames > 0: utterances sorted by length and packed into batches of at most that many video
    frames (similar lengths together, little padding), the batch order shuffled. Otherwise a
    shuffled order cut into batch_size. Batches smaller than `min_batch` (processes x accumulation
    steps) are merged into a neighbour, so every process always has work.
    """
    g = torch.Generator().manual_seed(seeds.epoch(seed, epoch, "batches"))
    if max_frames > 0:
        batches, cur, frames = [], [], 0
        for uid in sorted(ids, key=lambda u: (store.frames(u), u)):
            f = store.frames(uid)
            if cur and frames + f > max_frames:
                batches.append(cur)
                cur, frames = [], 0
            cur.append(uid)
            frames += f
        if cur:
            batches.append(cur)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    else:
        order = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
        batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    merged: list[list[str]] = []
    for b in batches:
        if merged and len(b) < min_batch:
            merged[-1] = merged[-1] + b
        else:
            merged.append(b)
    if len(merged) > 1 and len(merged[0]) < min_batch:
        merged[1] = merged[0] + merged[1]
        merged = merged[1:]
    return merged


def draw_copies(counts: dict[str, int], seed: int, epoch: int) -> dict[str, int | None]:
    """Per utterance, what training reads this epoch: one of its K augmented copies (0..K-1) or
    the original (None), drawn uniformly from the K+1, so clean speech stays in the mix.
    `counts` maps each utterance to K (0: only the original is cached)."""
    g = torch.Generator().manual_seed(seeds.epoch(seed, epoch, "copies"))
    out: dict[str, int | None] = {}
    for uid, k in counts.items():
        i = int(torch.randint(0, k + 1, (1,), generator=g)) if k else 0
        out[uid] = None if i == k else i  # i == k: the original
    return out


class MatryoshkaLoss(nn.Module):
    """forward(features, targets) -> (G,) summed token cross-entropies, one per configuration.

    The unit that DDP/FSDP wrap: every configuration's LLM pass happens inside one forward, so one
    backward reduces the gradients of all of them."""

    def __init__(self, model, rates: list[Rates], packed: bool) -> None:
        super().__init__()
        self.model = model
        self.rates = list(rates)
        self.packed = packed

    def forward(self, feats: dict, targets: list[list[int]]) -> torch.Tensor:
        return torch.stack(self.model.ce_sums(feats, self.rates, targets, packed=self.packed))


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """(rank, world, device). Initialises the process group when started by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local) if use_cuda else torch.device(device_pref if device_pref not in ("auto",) else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def wrap(loss_mod: MatryoshkaLoss, cfg: Config, device: torch.device, world: int):
    if world == 1:
        return loss_mod
    if cfg.train.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in loss_mod.model.llm.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(loss_mod)
        return loss_mod
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(loss_mod, device_ids=[device.index] if device.type == "cuda" else None)


def train(model, store: FeatureStore, texts: dict[str, str], cfg: Config, rates: list[Rates], exp: Path,
          meta: dict, log) -> Path:
    t = cfg.train
    rank, world, device = setup_distributed(t.device)
    main = rank == 0
    tok = model.tokenizer
    ids = store.ids()
    targets = {i: tok(texts[i], add_special_tokens=False).input_ids for i in ids}
    model.to(device)
    if t.grad_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step = 0
    ckpts = checkpoint.list_checkpoints(exp / "ckpt")
    last = ckpts[-1] if ckpts else None
    resume = last is not None and (last / "trainer.pt").is_file()
    if resume:  # trained tensors go in before any wrapping/sharding
        model.load_trainable(checkpoint.load_state(last))
    loss_mod = MatryoshkaLoss(model, rates, t.pack_rates)
    engine = wrap(loss_mod, cfg, device, world)
    fsdp = world > 1 and t.distributed == "fsdp"
    params = [p for p in engine.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    min_batch = world * t.accum_steps
    steps_per_epoch = len(plan_epoch(store, ids, t.batch_size, t.max_frames, t.seed, 0, min_batch))
    total = t.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, t.warmup_steps))
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    keep = max(t.keep_checkpoints, t.average_last)

    if resume:  # exactly where the last checkpoint left off
        tr = checkpoint.load_trainer(last)
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(engine, opt, tr["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(tr["optimizer"])
        sched.load_state_dict(tr["scheduler"])
        step = int(tr["step"])
        if main:
            log(f"train: resuming from {last.name} (step {step} of {total}, epoch {step // steps_per_epoch + 1})")
    metrics = open(exp / "metrics.jsonl", "a") if main else None
    if metrics is not None and step:  # drop records of steps after the checkpoint (they will be redone)
        metrics.close()
        lines = (exp / "metrics.jsonl").read_text().splitlines()
        (exp / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= step))
        metrics = open(exp / "metrics.jsonl", "a")
    tb = None
    if main and t.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(exp / "tb"))
        except ImportError:
            log("train: tensorboard is not installed; writing metrics.jsonl only")
    engine.train()
    fault = int(os.environ.get(FAULT_ENV, "0"))
    t_last, tok_since = time.perf_counter(), 0
    with bar() as pbar:
        task = pbar.add_task("train", total=total, completed=step, info="")
        while step < total:
            epoch, first = divmod(step, steps_per_epoch)
            plan = plan_epoch(store, ids, t.batch_size, t.max_frames, t.seed, epoch, min_batch)
            copies = draw_copies({i: store.copies(i) for i in ids}, cfg.augment.seed + t.seed, epoch)
            for bid in plan[first:]:
                t_step = time.perf_counter()
                torch.manual_seed(seeds.step(t.seed, step, rank))
                n_tok = sum(len(targets[i]) + 1 for i in bid)  # the global batch's target tokens
                mine = bid[rank::world]
                micro = [mine[k::t.accum_steps] for k in range(t.accum_steps)]
                sums = torch.zeros(len(rates), dtype=torch.float64)
                opt.zero_grad(set_to_none=True)
                for k, chunk in enumerate(micro):
                    feats = batch_features(store, chunk, cfg.model.modality, [copies[i] for i in chunk])
                    if t.time_mask:  # per-utterance seeds: the same masks whatever the process split
                        feats = augment.mask_features(feats, [seeds.time_mask(t.seed, step, bid.index(i))
                                                              for i in chunk])
                    feats = {m: (x.to(device), n.to(device)) for m, (x, n) in feats.items()}
                    sync = contextlib.nullcontext()
                    if world > 1 and k < len(micro) - 1 and hasattr(engine, "no_sync"):
                        sync = engine.no_sync()
                    try:
                        with sync:
                            faults.maybe_oom(len(chunk))
                            with autocast():
                                ce = engine(feats, [targets[i] for i in chunk])  # (G,)
                            # mean over configurations of (global token mean); DDP averages over processes
                            (ce.sum() / len(rates) / n_tok * world).backward()
                    except torch.OutOfMemoryError:
                        frames = sum(store.frames(i) for i in chunk)
                        raise MavsrError(
                            f"out of memory at step {step + 1} (epoch {epoch + 1}) on a micro-batch of {len(chunk)} "
                            f"utterances, {frames} video frames ({chunk[0]} .. {chunk[-1]}); lower train.batch_size "
                            f"or set train.max_frames below {frames}, or raise train.accum_steps; rerun to resume "
                            "from the last checkpoint") from None
                    sums += ce.detach().double().cpu()
                if world > 1:
                    s_dev = sums.to(device)
                    _dist().all_reduce(s_dev)
                    sums = s_dev.cpu()
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                opt.step()
                sched.step()
                step += 1
                per_rate = (sums / n_tok).tolist()
                loss = sum(per_rate) / len(per_rate)
                tok_since += n_tok
                if main:
                    now = time.perf_counter()
                    rec = {"step": step, "epoch": epoch + 1, "loss": round(loss, 5), "lr": sched.get_last_lr()[0],
                           "loss_per_rate": {r.tag: round(v, 5) for r, v in zip(rates, per_rate, strict=True)},
                           "utts": len(bid), "tokens": n_tok,
                           "tokens_per_s": round(n_tok / max(1e-9, now - t_step), 1)}
                    metrics.write(json.dumps(rec) + "\n")
                    if tb is not None:
                        tb.add_scalar("loss", loss, step)
                        for tag_, v in rec["loss_per_rate"].items():
                            tb.add_scalar(f"loss/{tag_}", v, step)
                        tb.add_scalar("lr", rec["lr"], step)
                    pbar.update(task, advance=1, info=f"epoch {epoch + 1} loss {loss:.3f} "
                                                      f"{rec['tokens_per_s']:.0f} tok/s")
                    if step % t.log_every == 0 or step == total:
                        tps = tok_since / max(1e-9, now - t_last)
                        t_last, tok_since = now, 0
                        log(f"step {step}/{total} epoch {epoch + 1} loss {loss:.4f} "
                            + " ".join(f"{k}={v:.3f}" for k, v in rec["loss_per_rate"].items())
                            + f" lr {rec['lr']:.2e} {tps:.0f} tok/s")
                end_of_epoch = step % steps_per_epoch == 0
                if (t.save_every and step % t.save_every == 0) or end_of_epoch or step == total:
                    state = _full_state(model) if fsdp else model.trainable_state()
                    osd = _full_optim_state(engine, opt) if fsdp else opt.state_dict()
                    if main:
                        metrics.flush()
                        trainer = {"optimizer": osd, "scheduler": sched.state_dict(), "step": step}
                        last = checkpoint.save(exp / "ckpt", step, state,
                                               {**meta, "step": step, "epoch": epoch + 1}, trainer, keep)
                    if world > 1:
                        _dist().barrier()
                    if fault and step == fault:
                        import signal

                        os.kill(os.getpid(), signal.SIGKILL)
                if end_of_epoch and main:
                    log(f"epoch {epoch + 1} done")
    if metrics is not None:
        metrics.close()
    if tb is not None:
        tb.close()
    if main and t.average_last > 1:
        last = average_last(exp / "ckpt", t.average_last, meta)
    model.eval()
    if world > 1:
        _dist().barrier()
    return last


def _full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def _full_optim_state(engine, opt) -> dict:
    """The whole optimizer state of a sharded (FSDP) run, gathered on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(engine, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def average_last(ckpt_root: Path, n: int, meta: dict) -> Path:
    """Average the trained tensors of the last n step checkpoints into ckpt/avg-<first>-<last>/."""
    ckpts = checkpoint.list_checkpoints(ckpt_root)[-n:]
    states = [checkpoint.load_state(c) for c in ckpts]
    avg = {k: sum(s[k].double() for s in states).div(len(states)).to(states[0][k].dtype) for k in states[0]}
    name = f"avg-{ckpts[0].name[5:]}-{ckpts[-1].name[5:]}"
    return checkpoint.save_named(ckpt_root, name, avg, {**meta, "averaged": [c.name for c in ckpts]})
