"""Many GPUs (or CPU processes) with PyTorch's own FSDP2, under torchrun.

    torchrun --nproc_per_node=8 train.py --model Qwen2-7B --no-lora --batch-size 16

Nothing distributed is home-made: torchrun starts one process per GPU, `fully_shard`
(FSDP2) splits every parameter, gradient and AdamW state across them and all-gathers a
layer's weights just before it runs. sso-mini only decides who does what:

- sampling: every rank holds the full policy (no gradients or optimizer state yet) and
  samples its share of the prompts; rank 0 gathers the records and writes pairs.jsonl;
- reference log-probs and training: the model is sharded, each optimizer step's records
  are dealt out across ranks, and each rank scales its loss so that FSDP's gradient
  average equals the single-process gradient of the whole step;
- files: rank 0 writes everything (metrics, the one HF folder) from full tensors gathered
  to it, except the resume state, which every rank writes for its own shards.

Every forward and backward of a sharded model is a collective call, so every rank must
make the same number of them: a rank with fewer records in a step runs extra micro-batches
with weight 0. With the gloo backend all of this runs on CPU processes too.
"""

import json
import os
import shutil

import torch
import torch.distributed as dist


def check_device(name: str) -> str | None:
    """Why `--device name` cannot run here, or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device (allowed: cpu, cuda, cuda:N)"
    if device.type not in ("cpu", "cuda"):
        return f"--device {name}: sso-mini runs on cpu or cuda"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: there are {torch.cuda.device_count()} CUDA devices"
    return None


def setup() -> tuple[int, int]:
    """(rank, world size). Starts the process group when torchrun started this process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank(), world


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shard(model, bf16: bool = False):
    """FSDP2 over the blocks, then the root (embeddings, final norm, head).

    `hidden_states` is our forward (training never asks for logits), so FSDP is told to
    gather the root's weights around it too. The root keeps them gathered after its
    forward, which is what lets the fused log-prob kernel use the head weight directly.
    bf16: compute in bf16 (the weights are all-gathered as bf16, half the traffic) while the
    shards, gradients and AdamW state stay fp32 and gradients are reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy or MixedPrecisionPolicy())
    fully_shard(model, mp_policy=policy or MixedPrecisionPolicy())
    register_fsdp_forward_method(model, "hidden_states")
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for sharded ones)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: list[float], device) -> list[float]:
    """Element-wise sum of a list of numbers over ranks."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def on_main(fn):
    """Run fn on rank 0 only; its result (or its ValueError, re-raised) reaches every rank."""
    if not dist.is_initialized():
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except ValueError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise ValueError(value)
    return value


def deal(items: list, n_ranks: int, r: int) -> list:
    """Rank r's share of items: every n_ranks-th one, starting at r."""
    return items[r::n_ranks]


def full_state_dict(model) -> dict:
    """Full CPU tensors of every parameter and buffer on rank 0 ({} on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def merge_shares(shares):
    """[(records, stats)] from each rank -> all records (rank 0's first) and summed stats."""
    records = [r for part, _ in shares for r in part]
    stats = {}
    for _, part in shares:
        for k, v in part.items():
            stats[k] = max(stats.get(k, 0), v) if k == "sample_seconds" else stats.get(k, 0) + v
    return records, stats


# --- the resume state of a sharded model: each rank writes and reads its own shards -----------------------


def local_shards(*state_dicts) -> dict:
    """This rank's pieces of (nested) state dicts as flat {name: CPU tensor}: a sharded tensor's local shard."""
    from torch.distributed.tensor import DTensor

    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}{i}.", v)
        elif isinstance(value, torch.Tensor):
            out[prefix[:-1]] = (value.to_local() if isinstance(value, DTensor) else value).detach().cpu().contiguous()

    for i, sd in enumerate(state_dicts):
        walk(f"{i}.", sd)
    return out


def save_sharded_state(path, model, optimizer, step: int):
    """The resume state of an FSDP2 model: every rank writes its shards of the weights and AdamW state with
    torch.distributed.checkpoint (no tensor is ever gathered whole), the digest of what it wrote and its RNG
    state; rank 0 the step. Into a temporary folder, renamed once every rank is done."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .assets import digest, write_atomic

    weights, optim = get_state_dict(model, optimizer)
    tmp = path.with_name(path.name + ".tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=tmp)
    shards = local_shards(weights, optim)
    mine = {"sha256": digest(shards), "rng": torch.get_rng_state().tolist()}
    write_atomic(tmp / f"rank{rank()}.json", json.dumps(mine))
    barrier()
    if is_main():
        write_atomic(tmp / "state.json", json.dumps({"step": step, "world_size": world_size()}))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier()


def load_sharded_state(path, model, optimizer) -> int:
    """The step save_sharded_state recorded, with the weights, AdamW state and RNG it saved put back; ValueError
    on every rank when any rank's shards do not match the digest recorded when they were written (a flipped
    bit), or the state was saved by another number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from .assets import digest

    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != world_size():
        raise ValueError(f"{path}: saved by {state['world_size']} ranks, resumed by {world_size()}")
    # the layout to read into, as CPU copies of this rank's shards (AdamW's state is made now): nothing of the
    # model changes until every rank's shards match their digests
    layout = get_state_dict(model, optimizer, options=StateDictOptions(cpu_offload=True))
    weights, optim = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, layout)  # (a CPU model: no copy)
    dcp.load({"model": weights, "optim": optim}, checkpoint_id=path)
    mine = json.loads((path / f"rank{rank()}.json").read_text())
    damaged = all_sum([float(digest(local_shards(weights, optim)) != mine["sha256"])],
                      next(model.parameters()).device)[0]
    if damaged:
        optimizer.state.clear()  # get_state_dict made AdamW's state: the epoch starts again from none
        raise ValueError(f"{path}: the shards of {int(damaged)} rank(s) do not match the digest recorded when they "
                         "were written")
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim)
    torch.set_rng_state(torch.tensor(mine["rng"], dtype=torch.uint8))
    return state["step"]
