"""Many GPUs (or CPU processes) with PyTorch's own FSDP2, under torchrun. Imported only there.

    torchrun --nproc_per_node=8 train.py --model Qwen2-7B --no-lora --batch-size 16

Nothing distributed is home-made: torchrun starts one process per GPU, `fully_shard` (FSDP2) splits
every parameter, gradient and AdamW state across them and all-gathers a layer's weights just before it
runs. sso-mini only decides who does what, through `Ranks` (a single process uses trainer.OneProcess,
whose methods do nothing):

- sampling: every rank holds the full policy (no gradients or optimizer state yet) and samples its
  share of the prompts; every rank gathers all the records, rank 0 writes pairs.jsonl;
- reference log-probs and training: the model is sharded, each optimizer step's records are dealt out
  across ranks, and each rank scales its loss so that FSDP's gradient average equals the
  single-process gradient of the whole step;
- files: rank 0 writes everything (metrics, the one HF folder) from full tensors gathered to it,
  except the resume state, which every rank writes for its own shards.

Every forward and backward of a sharded model is a collective call, so every rank must make the same
number of them: a rank with fewer records in a step runs extra micro-batches with weight 0. With the
gloo backend all of this runs on CPU processes too.
"""

import concurrent.futures
import datetime
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from .assets import replace_folder, sha256, write_atomic

WAIT = datetime.timedelta(minutes=60)  # a rank may wait long for the others (a longer share to sample, a compile)


class Ranks:
    """The processes torchrun started: trainer.OneProcess's methods over the process group, plus what only
    a sharded model needs (shard, full_state_dict, the resume state rank by rank)."""

    def __init__(self):
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=WAIT)
        self.objects = dist.new_group(backend="gloo", timeout=WAIT)  # Python objects travel on the CPU
        self.saves = dist.new_group(backend="gloo", timeout=WAIT)  # the background saves' own collectives
        self.hasher, self.pending = concurrent.futures.ThreadPoolExecutor(1), None  # (save_state)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0

    def share(self, items: list) -> list:
        """This rank's share of items: every size-th one, starting at its rank."""
        return items[self.rank::self.size]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.objects)
        return out

    def gather_records(self, records: list, counts: dict) -> tuple[list, dict]:
        """Every rank's sampled records (rank 0's first) and their counts summed (the slowest rank's sampling time)."""
        shares, stats = self.gather((records, dict(counts))), {}
        for _, part in shares:
            for k, v in part.items():
                stats[k] = max(stats.get(k, 0), v) if k == "sample_seconds" else stats.get(k, 0) + v
        return [r for part, _ in shares for r in part], stats

    def sum(self, values: list[float], device) -> list[float]:
        """Element-wise sum of a list of numbers over ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def share_micro_batches(self, micro_batches: list) -> list:
        """This rank's micro-batches of a step: every size-th one, topped up to the busiest rank's count with
        spare rounds (a copy of the first, weight 0), since every forward of a sharded model is a collective."""
        mine = micro_batches[self.rank::self.size]
        spare = (micro_batches[0][0], micro_batches[0][1], 0.0)  # weight 0: adds nothing
        return mine + [spare] * (-(-len(micro_batches) // self.size) - len(mine))

    def wait(self):
        dist.monitored_barrier(group=self.objects, timeout=WAIT)

    def on_rank0(self, fn):
        """Run fn on rank 0 only; its result (or its ValueError, re-raised) reaches every rank."""
        box = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except ValueError as e:
                box[0] = ("error", str(e))
        dist.broadcast_object_list(box, src=0, group=self.objects)
        status, value = box[0]
        if status == "error":
            raise ValueError(value)
        return value

    def close(self):
        self.hasher.shutdown()  # (a save still being written ends first)
        dist.destroy_process_group()

    @staticmethod
    def shard(model, bf16: bool = False):
        """FSDP2 over the blocks, then the root (embeddings, final norm, head).

        `hidden_states` is our forward (training never asks for logits), so FSDP is told to gather the
        root's weights around it too; the root keeps them gathered after its forward, which is what lets
        the fused log-prob kernel use the head weight directly. bf16: compute in bf16 (weights all-gathered
        as bf16, half the traffic) while shards, gradients and AdamW state stay fp32, reduced in fp32."""
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for layer in model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        register_fsdp_forward_method(model, "hidden_states")
        return model

    @staticmethod
    def full_state_dict(model) -> dict:
        """Full CPU tensors of every parameter and buffer on rank 0 ({} on the others)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_state(self, path, model, optimizer, step: int):
        """The resume state of an FSDP2 model, written in the background while training goes on: every rank
        copies its shards of the weights and AdamW state to the CPU (no tensor is ever gathered whole), then a
        thread writes them with torch.distributed.checkpoint into a temporary folder and records the sha256 of
        this rank's files beside its RNG state. The previous state is finished first (finish_save)."""
        self.finish_save()
        weights, optim = get_state_dict(model, optimizer)
        tmp = path.with_name(path.name + ".tmp")
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.wait()
        written = dcp.async_save({"model": weights, "optim": optim}, checkpoint_id=tmp, process_group=self.saves)
        rng = torch.get_rng_state().tolist()
        self.pending = (path, tmp, step, self.hasher.submit(self.record_files, written, tmp, rng))

    def record_files(self, written, tmp, rng: list):
        """(In the background) once this rank's files are written, their sha256 and the RNG state: rank<r>.json."""
        written.result()
        files = {f.name: sha256(f) for f in sorted(tmp.glob(f"__{self.rank}_*.distcp"))}
        write_atomic(tmp / f"rank{self.rank}.json", json.dumps({"sha256": files, "rng": rng}))

    def finish_save(self):
        """Wait for the state save_state began, if any: once every rank's files are written and hashed, rank 0
        records the step and renames the folder into place (until then the state before it stays). A rank that
        could not write its files stops every rank with the same OSError."""
        if self.pending is None:
            return
        path, tmp, step, recorded = self.pending
        self.pending = None
        try:
            recorded.result()
            failed = None
        except (Exception, CheckpointException) as e:  # a full disk: every rank stops, not only the one that failed
            failed = f"rank {self.rank}: {e}"
        failures = [f for f in self.gather(failed) if f]
        if failures:
            if self.main:  # (every rank's writing has ended: the half-written folder can go)
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"the resume state of step {step} was not written ({'; '.join(failures)}); the state of the "
                          "save before it stays")
        if self.main:
            write_atomic(tmp / "state.json", json.dumps({"step": step, "world_size": self.size}))
            replace_folder(tmp, path)
        self.wait()

    def load_state(self, path, model, optimizer) -> int:
        """The step save_state recorded, with the weights, AdamW state and RNG it saved put back; ValueError on
        every rank, before anything is read into the model, when any rank's files do not match the sha256
        recorded when they were written (a flipped bit), or the state was saved by another number of ranks."""
        state = json.loads((path / "state.json").read_text())
        if state["world_size"] != self.size:
            raise ValueError(f"{path}: saved by {state['world_size']} ranks, resumed by {self.size}")
        mine = json.loads((path / f"rank{self.rank}.json").read_text())
        bad = any(sha256(path / name) != h for name, h in mine["sha256"].items())
        damaged = self.sum([float(bad)], next(model.parameters()).device)[0]
        if damaged:
            raise ValueError(f"{path}: the shards of {int(damaged)} rank(s) do not match the digest recorded when "
                             "they were written")
        weights, optim = get_state_dict(model, optimizer)
        dcp.load({"model": weights, "optim": optim}, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim)
        torch.set_rng_state(torch.tensor(mine["rng"], dtype=torch.uint8))
        return state["step"]
