"""One SSO iteration of training: reference log-probs once, one epoch of the SSO loss, held-out metrics.

    records (pairs.jsonl) -> six sequences each, as 3 prompt-sharing groups, laid out once as every step's
      micro-batches (b records, or up to a token budget), each one packed row (batches.pack)
      -> reference log-probs (cached, no grad)
      -> for each step, for each micro-batch: ONE forward -> fused log-probs -> sso_loss -> backward
         (the gradients add up) -> clip -> AdamW -> cosine lr
      -> metrics.jsonl per step; the resume state every k steps (iter_t/resume/)
    held-out records -> scored by the reference before, and by the trained policy after, the epoch
      (score_records; eval/report.py turns them into eval_ metrics)

The reference is the iteration's starting weights. Scoring all six sequences with it
once, before the first update, means no second copy of the model is ever held.
Everything on disk is safetensors or JSON (no pickle), written atomically.
"""

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import CheckpointException
from safetensors.torch import save_file
from tqdm import tqdm

from .assets import digest, undo_on_failure, write_atomic
from .batches import collate_groups, pack
from .distributed import (all_sum, barrier, full_tensor, gather_objects, is_main, load_sharded_state,
                          save_sharded_state, world_size)
from .logprobs import packed_logprobs
from .losses import sso_loss


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last resume state is intact."""


@dataclass
class TrainConfig:
    loss_type: str = "ipo"
    form: str = "v1"
    use_w: bool = True
    use_g: bool = True
    theta: float = 0.1
    alpha: float = 0.66
    beta: float | None = None  # None: 0.2 for IPO, 0.1 for DPO
    gamma: float = 0.1
    terms: tuple = ("pos", "neg")  # form "generator": L+, L- or both (v2 Table 3)
    lr: float = 2e-5  # the default model on a CPU, from the learning curve (benchmarks/README.md); 7B: --lr 5e-7
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
    autocast: bool | None = None  # bf16 autocast; None: where bf16 matmuls are native (bf16_is_native)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to 0 (as HF's cosine schedule)."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg) -> tuple[torch.optim.AdamW, list]:
    """AdamW over the trainable parameters, without weight decay on norms and biases; returns it and
    its parameters in its own order (the resume state and clipping use it)."""
    if hasattr(model, "reshard"):  # FSDP2 keeps the root's weights gathered after a forward: the optimizer needs shards
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
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


def bf16_is_native(device) -> bool:
    """A GPU, or a CPU with bf16 dot-product units (AVX512-BF16, AMX): there bf16 autocast runs the
    matmuls several times faster than fp32 (benchmarks/README.md); elsewhere bf16 is emulated."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast(device, enabled: bool | None = None):
    """bf16 autocast (fp32 master weights, optimizer and log-prob sums); None: where it is native."""
    on = bf16_is_native(device) if enabled is None else enabled
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def score(model, groups, device, mixed: bool | None = None, flex: bool | None = None):
    """Summed log-probs and token counts of every response in prompt-sharing groups
    (batches.record_groups), packed in one row, plus the number of tokens the model ran. `mixed`:
    bf16 autocast (TrainConfig.autocast); the reference and the training forward must use the same.
    `flex`: attention through a block mask (default: on CUDA; model.packed_attention_mask)."""
    batch = collate_groups(groups, device)
    with autocast(device, mixed):
        logp, n = packed_logprobs(model, **batch, flex=flex)
    return logp, n, batch["input_ids"].numel()


def loss_settings(cfg: TrainConfig) -> dict:
    """The sso_loss keywords of a TrainConfig (the same for training steps and held-out metrics)."""
    return dict(loss_type=cfg.loss_type, form=cfg.form, use_w=cfg.use_w, use_g=cfg.use_g, theta=cfg.theta,
                alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, terms=tuple(cfg.terms))


@torch.no_grad()
def score_records(model, tokenizer, records, cfg: TrainConfig, cache: Path | None = None, progress=True,
                  desc="scoring"):
    """[R, 6] summed log-probs of every record's six sequences under `model`, cached in `cache`.

    The reference pass (the iteration's starting weights, before the first update) and the
    held-out pass (the trained weights) are this one function, so both score exactly alike.
    Under torchrun the records are dealt out across ranks and the rows gathered back.
    """
    if cache is not None and cache.exists():
        try:
            saved = load_tensors(cache)["logps"]
        except (SafetensorError, KeyError, ValueError):  # truncated or damaged: scored again, never used
            saved = None
        if saved is not None and saved.shape == (len(records), 6):
            return saved
    device = model.lm_head_weight.device
    was_training = model.training
    model.eval()
    (share,) = pack(tokenizer, records, [list(range(len(records)))], cfg.cutoff, cfg.micro_batch_size,
                    cfg.tokens_per_micro_batch)
    out = {}
    for groups, ids, weight in tqdm(share, desc=desc, disable=not progress):
        logp, _, _ = score(model, groups, device, cfg.autocast)
        if weight:  # not a spare round
            out |= dict(zip(ids, logp.float().cpu().view(len(ids), 6)))
    model.train(was_training)
    gathered = {i: logp for part in gather_objects(out) for i, logp in part.items()}
    logps = torch.stack([gathered[i] for i in range(len(records))])  # [R, 6]
    if cache is not None and is_main():
        save_tensors({"logps": logps}, cache)
    return logps


def save_tensors(tensors: dict, path: Path):
    """A safetensors file with the digest of its content in its metadata, written atomically: every
    cache and resume file sso-mini reads back is written here and read by load_tensors."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    os.close(fd)
    with undo_on_failure(path, lambda: os.unlink(tmp)):  # a full disk: no partial file, one line naming it
        save_hashed(tensors, tmp)
        os.replace(tmp, path)


def save_hashed(tensors: dict, path):
    save_file(tensors, str(path), metadata={"sha256": digest(tensors)})


def load_tensors(path: Path) -> dict:
    """The tensors of a save_tensors file; ValueError if they are not what was written (e.g. a flipped bit)."""
    with safe_open(path, "pt") as f:  # one read: the metadata and the tensors
        recorded = (f.metadata() or {}).get("sha256")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if recorded != digest(tensors):
        raise ValueError(f"{path}: its content does not match the hash recorded when it was written")
    return tensors


# --- the resume state: weights, optimizer, schedule position, RNG ---------------------------


def save_resume_state(path: Path, model, optimizer, step: int, params: list):
    """Everything needed to continue exactly from `step`, as safetensors + JSON, atomically. A sharded model
    (torchrun) saves its shards rank by rank instead (distributed.save_sharded_state)."""
    if world_size() > 1:
        return save_sharded_state(path, model, optimizer, step)
    index = {id(p): i for i, p in enumerate(params)}
    tensors = {f"{index[id(p)]}.{k}": v.detach().cpu().contiguous()
               for p, state in optimizer.state.items() for k, v in state.items()}
    weights = {k: v.detach().cpu().contiguous() for k, v in _trainable_state(model).items()}
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
    with undo_on_failure(path, lambda: shutil.rmtree(tmp)):  # a full disk: the last good state stays
        for name, t in (("optimizer", tensors), ("weights", weights), ("rng", {"torch": torch.get_rng_state()})):
            save_hashed(t, tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_resume_state(path: Path, model, optimizer, params: list) -> int:
    """Read every file first: an unreadable one (a truncated write) raises before anything changes."""
    if world_size() > 1:
        return load_sharded_state(path, model, optimizer)
    weights, saved = load_tensors(path / "weights.safetensors"), load_tensors(path / "optimizer.safetensors")
    rng, state = load_tensors(path / "rng.safetensors")["torch"], json.loads((path / "state.json").read_text())
    with torch.no_grad():
        for name, t in _trainable_state(model).items():
            t.copy_(weights[name])
    for key, v in saved.items():
        i, k = key.split(".", 1)
        p = params[int(i)]
        if k != "step":
            optimizer.state[p][k] = v.to(p.device)
        else:  # where torch keeps it
            optimizer.state[p][k] = v.to(p.device) if optimizer.defaults.get("fused") else v
    torch.set_rng_state(rng)
    return state["step"]


def _trainable_state(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --- the epoch --------------------------------------------------------------------------


def train_iteration(model, tokenizer, records, ref_logps, cfg: TrainConfig, out_dir: Path, *, iteration=0,
                    metrics_path: Path | None = None, progress=True, on_step=None) -> list[dict]:
    """One epoch of the SSO loss over `records`; resumes from out_dir/resume if present.

    Under torchrun (a sharded model) each step's records are dealt out across ranks.
    """
    device, ckpt = model.lm_head_weight.device, Path(out_dir) / "resume"
    steps = pack(tokenizer, records, epoch_order(len(records), cfg, iteration), cfg.cutoff, cfg.micro_batch_size,
                 cfg.tokens_per_micro_batch)  # every step's packed rows, built once
    optimizer, params = make_optimizer(model, cfg)
    start = resume(ckpt, model, optimizer, params, metrics_path, iteration)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    history, bar = [], tqdm(range(start, len(steps)), desc=f"iter {iteration} train", initial=start, total=len(steps),
                            disable=not progress or not is_main())
    for step in bar:
        t0, sums, tokens = time.perf_counter(), {}, 0
        for groups, ids, weight in steps[step]:  # micro-batches: the gradients add up
            logp, n, ntok = score(model, groups, device, cfg.autocast)  # [6b] summed log-probs and lengths
            loss, metrics = sso_loss(logp.float().view(-1, 6), ref_logps[ids].to(device), n.view(-1, 6),
                                     **loss_settings(cfg))
            (loss * weight * world_size()).backward()  # FSDP averages gradients over ranks: a sum over records
            sums, tokens = add_weighted(sums, metrics, weight), tokens + ntok * (weight > 0)
        sums, tokens = over_ranks(sums, tokens, device)  # the step's means over every record of every rank
        if not math.isfinite(sums["loss"]):
            raise TrainingError(f"non-finite loss at iteration {iteration} step {step}; "
                                f"the last good resume state is {ckpt if ckpt.exists() else 'the iteration start'}")
        lr, grad_norm = optimizer_step(optimizer, params, step, len(steps), cfg)
        history.append(log_step(metrics_path, iteration, step, len(steps), cfg, {
            **sums, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / (time.perf_counter() - t0)}))
        bar.set_postfix(loss=f"{sums['loss']:.4f}", acc=f"{sums['rewards/accuracies']:.2f}", W=f"{sums['W']:.3f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < len(steps):
            save_resume_state(ckpt, model, optimizer, step + 1, params)
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    model.gradient_checkpointing = False
    return history


def epoch_order(n: int, cfg: TrainConfig, iteration: int) -> list[list[int]]:
    """The record ids of each step: a seeded shuffle of the n records, cut into batches of cfg.batch_size."""
    order = list(range(n))
    random.Random(f"{cfg.seed}-{iteration}-order").shuffle(order)
    return [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]


def resume(ckpt: Path, model, optimizer, params, metrics_path: Path | None, iteration: int) -> int:
    """The step to start from: the one the resume state holds (loaded into model and optimizer), else 0.
    Metric rows logged past it by a killed run are dropped, so none is counted twice."""
    try:
        start = load_resume_state(ckpt, model, optimizer, params) if ckpt.exists() else 0
    except (SafetensorError, OSError, ValueError, KeyError, CheckpointException) as e:  # never from a damaged state
        if is_main():
            print(f"{ckpt}: the resume state is unreadable ({e}); the epoch starts again", file=sys.stderr)
        barrier()  # every rank has read (and failed) before the folder goes
        if is_main():
            shutil.rmtree(ckpt)
        start = 0
    if metrics_path is not None and is_main():
        _truncate_metrics(metrics_path, iteration, start)
    return start


def add_weighted(sums: dict, metrics: dict, weight: float) -> dict:
    return {key: sums.get(key, 0.0) + v * weight for key, v in metrics.items()}


def over_ranks(sums: dict, tokens: float, device) -> tuple[dict, float]:
    """Each rank's weighted metric sums and token count, summed over all ranks (one all-reduce)."""
    keys = sorted(sums)
    *values, tokens = all_sum([sums[key] for key in keys] + [tokens], device)
    return dict(zip(keys, values)), tokens


def log_step(metrics_path: Path | None, iteration: int, step: int, total: int, cfg: TrainConfig, metrics: dict) -> dict:
    """One step's metrics.jsonl row (rank 0 writes it), returned."""
    row = {"iteration": iteration, "split": "train", "step": step + 1, "steps": total, **metrics,
           # no update has changed the weights yet (the first step, or lr 0): every reward is 0
           "policy_is_reference": all(lr_at(j, total, cfg) == 0 for j in range(step))}
    if metrics_path is not None and is_main():
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def _truncate_metrics(path: Path, iteration: int, step: int):
    """Drop metric rows a killed run logged past its last resume state, so none is counted twice."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if (r["iteration"], r["step"]) <= (iteration, step)]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def write_config(path: Path, cfg: TrainConfig):
    write_atomic(path, json.dumps(asdict(cfg), indent=2))
