"""One epoch of the SSO objective, and the reference log-probs it compares against.

    records (pairs.jsonl) -> batches.pack: every step's micro-batches (groups of records), laid out once
    score_records: the sequences the loss reads, of every record, scored once, no grad   (the reference, cached;
                   the held-out records before and after the epoch)
    train_epoch:   for each step, for each micro-batch (packed in one row):
                       ONE forward -> fused log-probs -> sso_loss -> backward (the gradients add up)
                   -> clip -> AdamW -> cosine lr -> a metrics.jsonl row; every k steps, the resume state

The reference is the iteration's starting weights, scored once before the first update, so no second copy of the
model is ever held; held-out records are scored the same way before and after the epoch.
"""

import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from .assets import atomic_folder, load_tensors, save_tensors, write_atomic, write_json
from .batches import collate_groups, pack
from .logprobs import packed_logprobs
from .losses import columns_read, full_columns, sso_loss
from .records import read_jsonl


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last resume state is intact."""


@dataclass(frozen=True)
class TrainConfig:
    loss_type: str = "ipo"
    form: str = "v1"
    use_w: bool = True
    use_g: bool = True
    theta: float = 0.1
    alpha: float = 0.66
    beta: float | None = None  # None: 0.2 for IPO, 0.1 for DPO
    gamma: float = 0.1  # weight of the SFT term in v2's generator loss L+ and L- (v2 Eq. 2, 4)
    terms: tuple = ("pos", "neg")  # form "generator": L+, L- or both (v2 Table 3)
    lr: float = 2e-5  # the default model's, from the learning curve (benchmarks/README.md); 7B: --lr 5e-7
    batch_size: int = 8  # records per optimizer step
    micro_batch_size: int = 1  # records per forward (6 sequences, 3 prompts, packed in one row)
    tokens_per_micro_batch: int | None = None  # instead: as many records per forward as fit in this many tokens
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    cutoff: int = 2048
    gradient_checkpointing: bool = False
    save_every: int = 4  # steps
    seed: int = 0
    autocast: bool = False  # bf16 autocast with fp32 master weights (settings.py: on where bf16 is native)

    @property
    def columns(self) -> tuple:
        """The sequences (SEQUENCES columns) this loss reads: the only ones scored, for the reference and training."""
        return columns_read(self.form, self.use_g, self.terms)

    def loss_settings(self) -> dict:
        """The sso_loss keywords (the same for training steps and held-out metrics)."""
        return dict(loss_type=self.loss_type, form=self.form, use_w=self.use_w, use_g=self.use_g, theta=self.theta,
                    alpha=self.alpha, beta=self.beta, gamma=self.gamma, terms=tuple(self.terms))

    def save(self, path: Path):
        write_json(path, asdict(self))


class OneProcess:
    """A single process's ranks: every item is ours, nothing to gather or wait for (torchrun: distributed.Ranks)."""

    rank, size, main = 0, 1, True

    def on_rank0(self, fn):
        return fn()

    def share(self, items: list) -> list:
        return items

    def gather(self, obj) -> list:
        return [obj]

    def gather_records(self, records: list, counts: dict) -> tuple[list, dict]:
        return records, dict(counts)

    def sum(self, values: list[float], device) -> list[float]:
        return values

    def share_micro_batches(self, micro_batches: list) -> list:
        return micro_batches

    def wait(self):
        pass

    def finish_save(self):
        pass

    def close(self):
        pass


ONE_PROCESS = OneProcess()


def bf16_is_native(device) -> bool:
    """A GPU, or a CPU with bf16 dot-product units (AVX512-BF16, AMX); elsewhere bf16 is emulated, so slower."""
    if device.type == "cuda":
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def score(model, groups, autocast: bool):
    """Summed log-probs [S] and counts [S] of each response in packed record_groups, and the tokens the model ran."""
    device = model.lm_head_weight.device
    batch = collate_groups(groups, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):  # the reference's must match training's
        logp, n = packed_logprobs(model, batch)
    return logp, n, batch["input_ids"].numel()


@torch.no_grad()
def score_records(model, tokenizer, records, cfg: TrainConfig, cache: Path | None = None, progress=True,
                  desc="scoring", ranks=ONE_PROCESS) -> torch.Tensor:
    """[R, 6] summed log-probs of each record's sequences (NaN in the columns cfg's loss does not read), cached in
    `cache` (a damaged cache is scored again)."""
    saved = cached_logps(cache) if cache is not None else None
    if saved is not None and saved.shape == (len(records), 6) and saved[:, list(cfg.columns)].isfinite().all():
        return saved  # (a cache of another loss, without the columns this one reads, is scored again)
    if not records:
        return torch.zeros(0, 6)
    model.eval()
    (everything,) = pack(tokenizer, records, [list(range(len(records)))], cfg)  # one 'step' of every record
    mine = ranks.share_micro_batches(everything)
    out = {}
    for groups, ids, weight in tqdm(mine, desc=desc, disable=not progress):
        logp, _, _ = score(model, groups, cfg.autocast)
        if weight:  # (a spare round under torchrun has weight 0)
            out |= dict(zip(ids, logp.float().cpu().view(len(ids), len(cfg.columns))))
    gathered = {i: logp for part in ranks.gather(out) for i, logp in part.items()}
    logps = full_columns(torch.stack([gathered[i] for i in range(len(records))]), cfg.columns, float("nan"))  # [R, 6]
    if cache is not None and ranks.main:
        save_tensors({"logps": logps}, cache)
    return logps


def cached_logps(path: Path):
    """The log-probs a score_records cache holds, or None (missing or damaged: never used)."""
    try:
        return load_tensors(path)["logps"]
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to 0 (as HF's cosine schedule)."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg) -> tuple[torch.optim.AdamW, list]:
    """AdamW without weight decay on norms and biases, and its parameters in its order (for clipping, resume state)."""
    if hasattr(model, "reshard"):  # FSDP2 keeps the root's weights gathered after a forward: AdamW needs shards
        model.reshard()
    params = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=cfg.betas, fused=params[0].device.type == "cuda")
    return optimizer, decay + no_decay


def optimizer_step(optimizer, params, step: int, total: int, cfg) -> tuple[float, float]:
    """The step's learning rate, gradient clipping, the update: (lr, grad norm before clipping)."""
    lr = lr_at(step, total, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: a DTensor


def train_epoch(model, tokenizer, records, ref_logps, cfg: TrainConfig, out_dir: Path, *, iteration=0,
                metrics_path: Path | None = None, progress=True, ranks=ONE_PROCESS, on_step=None) -> list[dict]:
    """One SSO epoch over `records` (resuming from out_dir/resume); returns the metric rows, also in metrics_path."""
    device, state, columns = model.lm_head_weight.device, Path(out_dir) / "resume", cfg.columns
    steps = pack(tokenizer, records, epoch_order(len(records), cfg, iteration), cfg)  # [step][micro-batch]
    steps = [ranks.share_micro_batches(micro_batches) for micro_batches in steps]
    optimizer, params = make_optimizer(model, cfg)
    start = resume(state, model, optimizer, params, ranks)
    history = logged_steps(metrics_path, iteration, start, ranks)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    bar = tqdm(range(start, len(steps)), desc=f"iter {iteration} train", initial=start, total=len(steps),
               disable=not progress or not ranks.main)
    for step in bar:
        t0, sums, tokens = time.perf_counter(), {}, 0
        for groups, ids, weight in steps[step]:  # micro-batches: the gradients add up
            logp, n, ntok = score(model, groups, cfg.autocast)  # [b * k] summed log-probs and lengths, k columns
            policy = full_columns(logp.float().view(-1, len(columns)), columns, float("nan"))  # [b, 6]
            lengths = full_columns(n.view(-1, len(columns)), columns, 1)  # [b, 6]
            loss, metrics = sso_loss(policy, ref_logps[ids].to(device), lengths, **cfg.loss_settings())
            # the step's loss is the mean over its records; FSDP averages gradients over ranks, which * size undoes
            (loss * weight * ranks.size).backward()
            sums = {k: sums.get(k, 0.0) + v * weight for k, v in metrics.items()}
            tokens += ntok * (weight > 0)
        *values, tokens = ranks.sum([*sums.values(), tokens], device)  # the step's means over every record
        sums = dict(zip(sums, values))
        if not math.isfinite(sums["loss"]):
            raise TrainingError(f"non-finite loss at iteration {iteration} step {step}; "
                                f"the last good resume state is {state if state.exists() else 'the iteration start'}")
        lr, grad_norm = optimizer_step(optimizer, params, step, len(steps), cfg)
        row = {"iteration": iteration, "split": "train", "step": step + 1, "steps": len(steps), **sums, "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tokens / (time.perf_counter() - t0),
               # no update has changed the weights yet (the first step, or lr 0): every reward is 0
               "policy_is_reference": all(lr_at(j, len(steps), cfg) == 0 for j in range(step))}
        history.append(row)
        if metrics_path is not None and ranks.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        shown = {"loss": "loss", "acc": "rewards/accuracies", "W": "W"}  # what this loss logs of them
        bar.set_postfix({name: f"{sums[k]:.3f}" for name, k in shown.items() if k in sums})
        if (step + 1) % cfg.save_every == 0 and step + 1 < len(steps):
            save_resume_state(state, model, optimizer, step + 1, params, ranks)
        if on_step is not None:
            on_step(step + 1)
    ranks.finish_save()  # (torchrun: the last resume state is written in the background)
    model.eval()
    model.gradient_checkpointing = False
    return history


def epoch_order(n: int, cfg: TrainConfig, iteration: int) -> list[list[int]]:
    """The record ids of each step: a seeded shuffle of the n records, cut into batches of cfg.batch_size."""
    order = list(range(n))
    random.Random(f"{cfg.seed}-{iteration}-order").shuffle(order)
    return [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]


def save_resume_state(path: Path, model, optimizer, step: int, params: list, ranks=ONE_PROCESS):
    """Everything needed to continue exactly from `step`, as hashed safetensors + JSON in a folder written whole
    (a crash or a full disk leaves the last good state). Under torchrun each rank writes its shards."""
    if ranks.size > 1:
        return ranks.save_state(path, model, optimizer, step)
    index = {id(p): i for i, p in enumerate(params)}
    tensors = {"optimizer": {f"{index[id(p)]}.{k}": v.detach().cpu().contiguous()
                             for p, s in optimizer.state.items() for k, v in s.items()},
               "weights": {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
               "rng": {"torch": torch.get_rng_state()}}
    with atomic_folder(path) as tmp:  # a full disk: the last state stays
        for name, t in tensors.items():
            save_tensors(t, tmp / f"{name}.safetensors")
        write_atomic(tmp / "state.json", json.dumps({"step": step}))


def load_resume_state(path: Path, model, optimizer, params: list) -> int:
    """The step save_resume_state recorded, its state put back; a file failing its hash raises before any change."""
    weights, saved = load_tensors(path / "weights.safetensors"), load_tensors(path / "optimizer.safetensors")
    rng, step = load_tensors(path / "rng.safetensors")["torch"], json.loads((path / "state.json").read_text())["step"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(weights[name])
    for key, v in saved.items():
        i, k = key.split(".", 1)
        p = params[int(i)]
        # AdamW keeps its step count on the CPU, unless it is fused
        optimizer.state[p][k] = v if k == "step" and not optimizer.defaults.get("fused") else v.to(p.device)
    torch.set_rng_state(rng)
    return step


def resume(path: Path, model, optimizer, params, ranks=ONE_PROCESS) -> int:
    """The step the resume state holds (loaded into model and optimizer), else 0: an unreadable state is never used."""
    if not path.exists():
        return 0
    try:
        return ranks.load_state(path, model, optimizer) if ranks.size > 1 else \
            load_resume_state(path, model, optimizer, params)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        if ranks.main:
            print(f"{path}: the resume state is unreadable ({e}); the epoch starts again", file=sys.stderr)
        ranks.wait()  # every rank has read (and failed) before the folder goes
        if ranks.main:
            shutil.rmtree(path)
        return 0


def logged_steps(metrics_path: Path | None, iteration: int, up_to: int | None = None, ranks=ONE_PROCESS) -> list[dict]:
    """This iteration's metrics.jsonl rows up to step `up_to`; a killed run's later rows leave it (none count twice)."""
    if metrics_path is None or not metrics_path.exists():
        return []
    rows = read_jsonl(metrics_path, required=())
    if up_to is not None:
        kept = [r for r in rows if (r["iteration"], r["step"]) <= (iteration, up_to)]
        if ranks.main and len(kept) < len(rows):
            write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        rows = kept
    return [r for r in rows if r["iteration"] == iteration and r["split"] == "train"]
