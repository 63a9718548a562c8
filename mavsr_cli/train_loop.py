"""The Matryoshka training loop (docs/method.md, "Matryoshka training").

Every step: load the native-rate features of a batch once (the cache stands in for "encode once"),
then for each rate configuration of the grid compress, project and run the LLM, and average the
losses with equal weights. Each configuration's backward runs right after its forward, gradients
accumulating, so a step holds one configuration's activations at a time (`train.backward`). With
one shared LoRA (MS) a joint backward (`train.backward: joint`, or `train.pack_rates`) runs the
configurations in one LLM pass, their rows merged (model/merged.py): the same losses and gradients
at LoRA dropout 0 (with dropout, other draws), 1.13-1.16x faster a step on issue 21's shapes on a
2-core CPU (benchmarks/vs_authors.md). Under FSDP or gradient checkpointing they run apart.

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
from .model.build import train_bf16
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


def optimizer(params: list, t, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW as the reference code sets it; fused (one kernel over every tensor, where the device has
    one) unless the parameters are FSDP shards."""
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=fused or None)


def step_frames(t, world: int) -> int:
    """The video frames one global step may hold: train.max_frames, or that many per process and
    micro-batch (train.max_frames_per gpu, the reference code's per-GPU batches)."""
    return t.max_frames * (world * t.accum_steps if t.max_frames_per == "gpu" else 1)


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
    """forward(features, targets, which=None) -> (G,) summed token cross-entropies, one per
    configuration (`which`: only that configuration's, (1,)).

    The unit that DDP/FSDP wrap, so every configuration's LLM pass goes through the wrapper."""

    def __init__(self, model, rates: list[Rates], packed: bool) -> None:
        super().__init__()
        self.model = model
        self.rates = list(rates)
        self.packed = packed

    def forward(self, feats: dict, targets: list[list[int]], which: int | None = None) -> torch.Tensor:
        rates = self.rates if which is None else [self.rates[which]]
        return torch.stack(self.model.ce_sums(feats, rates, targets, packed=self.packed and which is None))


def matryoshka_backward(engine, feats: dict, targets: list[list[int]], n_cfg: int, scale: float, per_config: bool,
                        autocast=contextlib.nullcontext, defer=contextlib.nullcontext,
                        sync_last: bool = True) -> torch.Tensor:
    """Forward and backward of one micro-batch over every configuration; the loss is scale x the sum
    of their cross-entropies. -> (G,) summed cross-entropies, detached.

    joint: one forward of all G configurations and one backward, so all G graphs are alive at once.
    per_config: each configuration's forward and backward in turn, gradients accumulating in .grad:
    the same gradient (a sum is a sum; float order aside, tested), and the activations of a step peak
    at one configuration's instead of G (the shared features carry no graph). `defer` (DDP's
    no_sync) wraps every backward but the last, and that one too unless `sync_last`."""
    def hold(last: bool):
        return contextlib.nullcontext() if last and sync_last else defer()

    if not per_config:
        with hold(True):
            with autocast():
                ce = engine(feats, targets)  # (G,)
            (ce.sum() * scale).backward()
        return ce.detach()
    out = []
    for g in range(n_cfg):
        with hold(g == n_cfg - 1):
            with autocast():
                ce = engine(feats, targets, which=g)  # (1,)
            (ce.sum() * scale).backward()
        out.append(ce.detach())
    return torch.cat(out)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def device_type(device_pref: str) -> str:
    """train.device as the device type training runs on (auto: cuda when there is one)."""
    if device_pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_pref


def setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """(rank, world, device). Initialises the process group when started by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_type(device_pref) == "cuda"
    device = torch.device("cuda", local) if use_cuda else torch.device(device_type(device_pref))
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def joint_because(t, world: int) -> str:
    """Why a step runs one joint backward whatever train.backward asks, or "" where it need not."""
    if t.pack_rates:
        return "train.pack_rates packs the configurations into one pass"
    if world > 1 and t.distributed == "fsdp":
        return "under FSDP each configuration's backward would gather and reduce every layer's shards again"
    return ""


def per_config_backward(t, world: int) -> bool:
    """Whether a step runs the backward configuration by configuration (train.backward, unless
    joint_because says why not)."""
    return t.backward == "per_config" and not joint_because(t, world)


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

    # per configuration, a forward uses only its own projectors (and SS/MSS adapters): DDP must look
    # for the unused ones, whose gradients accumulated under no_sync it then reduces with the rest
    return DDP(loss_mod, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=per_config_backward(cfg.train, world))


class Trainer:
    """One Matryoshka training run, as torchtune's recipes read: set-up (here), resume, one step,
    logging and saving as methods, and `fit`, the loop over them."""

    def __init__(self, model, store: FeatureStore, texts: dict[str, str], cfg: Config, rates: list[Rates],
                 exp: Path, meta: dict, log, val: tuple[FeatureStore, dict[str, str]] | None = None) -> None:
        t = self.t = cfg.train
        self.cfg, self.model, self.store, self.rates, self.exp, self.meta, self.log = (
            cfg, model, store, rates, exp, meta, log)
        self.val = None
        if val is not None:  # (store, {id: token ids}) of the validation split
            vstore, vtexts = val
            self.val = (vstore, {i: model.tokenizer(vtexts[i], add_special_tokens=False).input_ids
                                 for i in vstore.ids() if i in vtexts})
        self.rank, self.world, self.device = setup_distributed(t.device)
        self.main = self.rank == 0
        self.ids = store.ids()
        self.targets = {i: model.tokenizer(texts[i], add_special_tokens=False).input_ids for i in self.ids}
        model.to(self.device)
        if t.grad_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ckpts = checkpoint.list_checkpoints(exp / "ckpt")
        self.last = ckpts[-1] if ckpts else None
        self.resuming = self.last is not None and (self.last / "trainer.pt").is_file()
        if self.resuming:  # trained tensors go in before any wrapping/sharding
            model.load_trainable(checkpoint.load_state(self.last))
        self.engine = wrap(MatryoshkaLoss(model, rates, t.pack_rates), cfg, self.device, self.world)
        self.fsdp = self.world > 1 and t.distributed == "fsdp"
        self.per_config = per_config_backward(t, self.world)
        # what runs, in every checkpoint's meta and meta.json (config.yaml keeps what was asked)
        self.meta["backward"] = "per_config" if self.per_config else "joint"
        self.params = [p for p in self.engine.parameters() if p.requires_grad]
        self.opt = optimizer(self.params, t, fused=not self.fsdp)
        self.min_batch = self.world * t.accum_steps
        self.steps_per_epoch = len(self.plan(0))
        self.total = t.epochs * self.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.total, t.warmup_steps))
        bf16 = train_bf16(t, self.device.type) or model.frozen_dtype == torch.bfloat16  # bf16 weights: bf16 matmuls
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 \
            else contextlib.nullcontext
        self.step_no = 0
        self.metrics = self.tb = None
        self.epoch_recs: list[dict] = []  # this epoch's step records (main process), for its mean loss

    def plan(self, epoch: int) -> list[list[str]]:
        t = self.t
        return plan_epoch(self.store, self.ids, t.batch_size, step_frames(t, self.world), t.seed, epoch,
                          self.min_batch)

    # ---- resume --------------------------------------------------------------------------------
    def resume(self) -> None:
        """Exactly where the last checkpoint left off (optimizer, scheduler, step); then open the
        logs: metrics.jsonl cut back to that step, TensorBoard if asked."""
        if self.resuming:
            tr = checkpoint.load_trainer(self.last)
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.engine, self.opt, tr["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.opt.load_state_dict(tr["optimizer"])
            self.sched.load_state_dict(tr["scheduler"])
            self.step_no = int(tr["step"])
            if self.main:
                self.log(f"train: resuming from {self.last.name} (step {self.step_no} of {self.total}, "
                         f"epoch {self.step_no // self.steps_per_epoch + 1})")
        if self.main:
            self._log_passes()
            self._open_logs()

    def _log_passes(self) -> None:
        """One line when the backward runs joint although train.backward asks per_config
        (joint_because), and one when a joint MS step, which would share one merged LLM pass among its
        configurations (model/merged.py), must run them apart: FSDP and gradient checkpointing act on a
        layer's call."""
        if self.meta["backward"] != self.t.backward:
            self.log(f"train: one joint backward, not per_config as train.backward asks: "
                     f"{joint_because(self.t, self.world)}")
        from .model import merged

        m = self.model
        if self.per_config or len(self.rates) < 2 or m.strategy != "ms" or merged.mergeable(m.llm_decoder()):
            return
        why = ("FSDP's per-layer hooks act" if self.fsdp else "gradient checkpointing acts" if self.t.grad_checkpointing
               else "hooks on its layers act")
        self.log(f"train: the {len(self.rates)} configurations run in separate LLM passes, not one merged pass: "
                 f"{why} on each layer's call, which a merged pass does not make")

    def _open_logs(self) -> None:
        path = self.exp / "metrics.jsonl"
        if self.step_no and path.is_file():  # drop records of steps after the checkpoint (they will be redone)
            lines = [x for x in path.read_text().splitlines() if json.loads(x)["step"] <= self.step_no]
            path.write_text("".join(x + "\n" for x in lines))
            recs = [json.loads(x) for x in lines]
            epoch = self.step_no // self.steps_per_epoch + 1
            self.epoch_recs = [r for r in recs if "loss" in r and r["epoch"] == epoch]
        self.metrics = open(path, "a")
        if self.t.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.exp / "tb"))
            except ImportError:
                self.log("train: tensorboard is not installed; writing metrics.jsonl only")

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self, bid: list[str], epoch: int, copies: dict) -> tuple[list[float], int]:
        """One optimizer step over global batch `bid` -> (mean token loss per configuration, target tokens)."""
        t, step = self.t, self.step_no
        torch.manual_seed(seeds.step(t.seed, step, self.rank))
        n_tok = sum(len(self.targets[i]) + 1 for i in bid)  # the global batch's target tokens
        mine = bid[self.rank::self.world]
        micro = [mine[k::t.accum_steps] for k in range(t.accum_steps)]
        sums = torch.zeros(len(self.rates), dtype=torch.float64)
        self.opt.zero_grad(set_to_none=True)
        for k, chunk in enumerate(micro):
            sums += self._backward(chunk, bid, epoch, copies, n_tok, last=k == len(micro) - 1)
        if self.world > 1:
            s_dev = sums.to(self.device)
            _dist().all_reduce(s_dev)
            sums = s_dev.cpu()
        torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step_no += 1
        return (sums / n_tok).tolist(), n_tok

    def _defer(self):
        """Gradients accumulate without being reduced across processes (DDP's no_sync)."""
        if self.world > 1 and hasattr(self.engine, "no_sync"):
            return self.engine.no_sync()
        return contextlib.nullcontext()

    def _backward(self, chunk: list[str], bid: list[str], epoch: int, copies: dict, n_tok: int,
                  last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (`last`: the step's, whose backward reduces the
        gradients across processes); returns its summed cross-entropies (G,)."""
        t, step = self.t, self.step_no
        feats = batch_features(self.store, chunk, self.cfg.model.modality, [copies[i] for i in chunk])
        if t.time_mask:  # per-utterance seeds: the same masks whatever the process split
            feats = augment.mask_features(feats, [seeds.time_mask(t.seed, step, bid.index(i)) for i in chunk])
        feats = {m: (x.to(self.device), n.to(self.device)) for m, (x, n) in feats.items()}
        try:
            faults.maybe_oom(len(chunk))
            # mean over configurations of (global token mean); DDP averages over processes
            ce = matryoshka_backward(self.engine, feats, [self.targets[i] for i in chunk], len(self.rates),
                                     self.world / len(self.rates) / n_tok, self.per_config, self.autocast,
                                     self._defer, sync_last=last)
        except torch.OutOfMemoryError:
            frames = sum(self.store.frames(i) for i in chunk)
            raise MavsrError(
                f"out of memory at step {step + 1} (epoch {epoch + 1}) on a micro-batch of {len(chunk)} "
                f"utterances, {frames} video frames ({chunk[0]} .. {chunk[-1]}); lower train.batch_size "
                f"or set train.max_frames below {frames}, or raise train.accum_steps; rerun to resume "
                "from the last checkpoint") from None
        return ce.double().cpu()

    # ---- logging and saving --------------------------------------------------------------------
    def record(self, per_rate: list[float], n_tok: int, n_utts: int, epoch: int, seconds: float) -> dict:
        """The step's metrics.jsonl record (and TensorBoard scalars)."""
        loss = sum(per_rate) / len(per_rate)
        rec = {"step": self.step_no, "epoch": epoch + 1, "loss": round(loss, 5), "lr": self.sched.get_last_lr()[0],
               "loss_per_rate": {r.tag: round(v, 5) for r, v in zip(self.rates, per_rate, strict=True)},
               "utts": n_utts, "tokens": n_tok, "tokens_per_s": round(n_tok / max(1e-9, seconds), 1)}
        self.metrics.write(json.dumps(rec) + "\n")
        self.epoch_recs.append(rec)
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, self.step_no)
            for tag, v in rec["loss_per_rate"].items():
                self.tb.add_scalar(f"loss/{tag}", v, self.step_no)
            self.tb.add_scalar("lr", rec["lr"], self.step_no)
        return rec

    @torch.no_grad()
    def validate(self) -> list[float]:
        """Mean token cross-entropy per configuration on the validation split (eval mode, clean
        features, no masking); every process computes all of it, so FSDP's collectives line up."""
        vstore, vtargets = self.val
        ids = sorted(vtargets)
        sums, n_tok = torch.zeros(len(self.rates), dtype=torch.float64), 0
        self.engine.eval()
        for b in range(0, len(ids), self.t.batch_size):
            chunk = ids[b:b + self.t.batch_size]
            feats = batch_features(vstore, chunk, self.cfg.model.modality)
            feats = {m: (x.to(self.device), n.to(self.device)) for m, (x, n) in feats.items()}
            with self.autocast():
                sums += self.engine(feats, [vtargets[i] for i in chunk]).double().cpu()
            n_tok += sum(len(vtargets[i]) + 1 for i in chunk)
        if self.fsdp:  # a forward without backward leaves the root's parameters gathered: shard them again
            from torch.distributed.fsdp import FSDPModule

            for m in self.engine.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
        self.engine.train()
        return (sums / max(n_tok, 1)).tolist()

    def end_epoch(self, epoch: int) -> float | None:
        """train.log and metrics.jsonl: the epoch's training loss (the token mean of its step records,
        so a resumed run reports what an uninterrupted one does) and validation loss, each overall
        and per configuration; returns the latter."""
        rec = {"step": self.step_no, "epoch": epoch + 1}
        parts = []
        n_tok = sum(r["tokens"] for r in self.epoch_recs)
        train = [sum(r["loss_per_rate"][x.tag] * r["tokens"] for r in self.epoch_recs) / n_tok
                 for x in self.rates] if n_tok else None
        self.epoch_recs = []
        for name, per_rate in (("train", train), ("val", self.validate() if self.val is not None else None)):
            if per_rate is None:
                continue
            mean = sum(per_rate) / len(per_rate)
            rec[f"{name}_loss"] = round(mean, 5)
            rec[f"{name}_loss_per_rate"] = {r.tag: round(v, 5) for r, v in zip(self.rates, per_rate, strict=True)}
            parts.append(f"{name} loss {mean:.4f} (" + " ".join(f"{k}={v:.3f}" for k, v in
                                                            rec[f"{name}_loss_per_rate"].items()) + ")")
        if self.main:
            self.metrics.write(json.dumps(rec) + "\n")
            self.log(f"epoch {epoch + 1}/{self.t.epochs} done: " + "; ".join(parts))
        return rec.get("val_loss")

    def save(self, epoch: int, val_loss: float | None = None) -> None:
        """A step checkpoint (trained tensors, optimizer, scheduler; its validation loss in the meta at
        an epoch's end), then the kill-after-checkpoint fault."""
        state = _full_state(self.model) if self.fsdp else self.model.trainable_state()
        osd = _full_optim_state(self.engine, self.opt) if self.fsdp else self.opt.state_dict()
        if self.main:
            self.metrics.flush()
            trainer = {"optimizer": osd, "scheduler": self.sched.state_dict(), "step": self.step_no}
            meta = {**self.meta, "step": self.step_no, "epoch": epoch + 1,
                    **({"val_loss": val_loss} if val_loss is not None else {})}
            best = max(1, self.t.average_last) if self.t.select == "best" else 0
            keep = self.t.keep_checkpoints if best else max(self.t.keep_checkpoints, self.t.average_last)
            self.last = checkpoint.save(self.exp / "ckpt", self.step_no, state, meta, trainer, keep, best)
        if self.world > 1:
            _dist().barrier()
        fault = int(os.environ.get(FAULT_ENV, "0"))
        if fault and self.step_no == fault:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> Path:
        """Close the logs; average the last checkpoints if asked; the checkpoint to decode."""
        for f in (self.metrics, self.tb):
            if f is not None:
                f.close()
        if self.main:
            chosen = checkpoint.selected(self.exp / "ckpt", self.t.select, max(1, self.t.average_last))
            if len(chosen) > 1:
                self.last = average(chosen, self.meta)
            elif chosen and chosen[0] != self.last:
                self.last = chosen[0]
                self.log(f"train: the checkpoint of lowest validation loss is {self.last.name}")
        self.model.eval()
        if self.world > 1:
            _dist().barrier()
        return self.last

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> Path:
        t = self.t
        self.resume()
        self.engine.train()
        t_last, tok_since = time.perf_counter(), 0
        with bar() as pbar:
            task = pbar.add_task("train", total=self.total, completed=self.step_no, info="")
            while self.step_no < self.total:
                epoch, first = divmod(self.step_no, self.steps_per_epoch)
                copies = draw_copies({i: self.store.copies(i) for i in self.ids}, self.cfg.augment.seed + t.seed, epoch)
                for bid in self.plan(epoch)[first:]:
                    t_step = time.perf_counter()
                    per_rate, n_tok = self.train_step(bid, epoch, copies)
                    tok_since += n_tok
                    if self.main:
                        now = time.perf_counter()
                        rec = self.record(per_rate, n_tok, len(bid), epoch, now - t_step)
                        loss = sum(per_rate) / len(per_rate)
                        pbar.update(task, advance=1, info=f"epoch {epoch + 1}/{t.epochs} loss {loss:.3f} "
                                                          f"{rec['tokens_per_s']:.0f} tok/s")
                        if self.step_no % t.log_every == 0 or self.step_no == self.total:
                            self._log_line(rec, loss, tok_since / max(1e-9, now - t_last))
                            t_last, tok_since = now, 0
                    end_of_epoch = self.step_no % self.steps_per_epoch == 0
                    val_loss = self.end_epoch(epoch) if end_of_epoch else None
                    if (t.save_every and self.step_no % t.save_every == 0) or end_of_epoch \
                            or self.step_no == self.total:
                        self.save(epoch, val_loss)
        return self.close()

    def _log_line(self, rec: dict, loss: float, tokens_per_s: float) -> None:
        self.log(f"step {rec['step']}/{self.total} epoch {rec['epoch']} loss {loss:.4f} "
                 + " ".join(f"{k}={v:.3f}" for k, v in rec["loss_per_rate"].items())
                 + f" lr {rec['lr']:.2e} {tokens_per_s:.0f} tok/s")


def train(model, store: FeatureStore, texts: dict[str, str], cfg: Config, rates: list[Rates], exp: Path,
          meta: dict, log, val: tuple[FeatureStore, dict[str, str]] | None = None) -> Path:
    """Train `model`'s projectors and adapters on every configuration of `rates`; returns the
    checkpoint to decode (exp/<tag>/ckpt/...)."""
    return Trainer(model, store, texts, cfg, rates, exp, meta, log, val).fit()


def _full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def _full_optim_state(engine, opt) -> dict:
    """The whole optimizer state of a sharded (FSDP) run, gathered on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(engine, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def average(ckpts: list[Path], meta: dict) -> Path:
    """Average the trained tensors of these step checkpoints into ckpt/avg-<first>-<last>/."""
    ckpt_root = ckpts[0].parent
    states = [checkpoint.load_state(c) for c in ckpts]
    avg = {k: sum(s[k].double() for s in states).div(len(states)).to(states[0][k].dtype) for k in states[0]}
    name = f"avg-{ckpts[0].name[5:]}-{ckpts[-1].name[5:]}"
    return checkpoint.save_named(ckpt_root, name, avg, {**meta, "averaged": [c.name for c in ckpts]})
