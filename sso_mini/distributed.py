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
- files: rank 0 writes everything (metrics, checkpoints, the one HF folder) from full
  tensors gathered to it.

Every forward and backward of a sharded model is a collective call, so every rank must
make the same number of them: a rank with fewer records in a step runs extra micro-batches
with weight 0. With the gloo backend all of this runs on CPU processes too.
"""

import os

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


def shard(model):
    """FSDP2 over the blocks, then the root (embeddings, final norm, head).

    `hidden_states` is our forward (training never asks for logits), so FSDP is told to
    gather the root's weights around it too. The root keeps them gathered after its
    forward, which is what lets the fused log-prob kernel use the head weight directly.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for sharded ones)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `t` is: this rank's shard when `t` is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=t.device, dtype=t.dtype)
    return distribute_tensor(full, t.device_mesh, t.placements) if isinstance(t, DTensor) else full


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
