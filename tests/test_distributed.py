"""torchrun + FSDP2 on CPU processes (gloo): two ranks train exactly like one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = [("Answer helpfully.", "Answer rudely."), ("Be warm.", "Be cold."), ("Be precise.", "Be vague.")]


def records(n):
    """n distinct hand-made records; 7 with --batch-size 4 leaves a last step of 3 (2 + 1 over two ranks)."""
    out = []
    for i in range(n):
        p, neg = SYSTEMS[i % 3]
        out.append({"prompt": f"Question {i}: name a fruit.", "system": "", "p_system": p, "n_system": neg,
                    "chosen": f"An apple, number {i}, is a tasty fruit.", "rejected": "No. Figure it out.",
                    "raw": f"Apple {i}."})
    return out


def run(*args, nproc=1, cwd, script=ROOT / "train.py"):
    """train.py (or a script that patches it, then calls train.cli) on the CPU, under torchrun when nproc > 1."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), str(script), *args, "--device", "cpu",
           "--no-progress"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_two_ranks_match_one_process(tiny_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records(7)))
    common = ["--model", str(tiny_model_dir), "--pairs", str(pairs), "--batch-size", "4", "--lr", "1e-3",
              "--save-every", "1", "--no-autocast"]  # fp32 throughout: the two must agree to float rounding
    one = run(*common, "--out", str(tmp_path / "one"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = run(*common, "--out", str(tmp_path / "two"), nproc=2, cwd=tmp_path)
    assert two.returncode == 0, two.stderr

    rows = {k: [json.loads(line) for line in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1, 2]  # rank 0 alone writes: no duplicated rows
    for key in ("loss", "W", "rewards/accuracies", "p_rewards/margins", "n_logps/chosen", "grad_norm"):
        a, b = [r[key] for r in rows["one"]], [r[key] for r in rows["two"]]
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6), (key, a, b)
    ref = {k: load_file(tmp_path / k / "iter_0" / "ref_logps.safetensors")["logps"] for k in ("one", "two")}
    assert torch.allclose(ref["one"], ref["two"], atol=1e-5)

    # each rank packs all its records of a step into one forward (the packed rows of a GPU run): the first
    # step (before any update, whose float rounding AdamW magnifies) has the same loss and gradient norm
    packed = run(*common, "--out", str(tmp_path / "packed"), "--tokens-per-micro-batch", "100000", nproc=2,
                 cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr
    first = json.loads((tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "W", "p_rewards/margins", "n_logps/chosen", "grad_norm"):  # (accuracies of ~0 rewards: noise)
        # fp32 sums in another order (longer rows); attention leaking across records would be far off
        assert abs(first[key] - rows["one"][0][key]) <= 1e-4 * abs(rows["one"][0][key]) + 1e-6, key
    assert torch.allclose(load_file(tmp_path / "packed" / "iter_0" / "ref_logps.safetensors")["logps"], ref["one"],
                          atol=1e-5)

    start = load_file(tiny_model_dir / "model.safetensors")
    w1 = load_file(tmp_path / "one" / "iter_0" / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "iter_0" / "model" / "model.safetensors")
    assert w1.keys() == w2.keys() == start.keys()  # one plain HF folder, no sharded pieces
    assert any(not torch.equal(w1[k], start[k]) for k in w1)  # training moved the weights
    for k in w1:  # steps move weights by ~2e-3; sums in another order differ by float rounding, which
        # AdamW's g / sqrt(v) magnifies on near-zero gradients (unused embedding rows): 1e-5 bounds it
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


def test_two_ranks_sample_and_chain_iterations(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a fruit.\nSay hello.\nCount to three.\nName a color.\nGive a tip.\nName a tree.\n"
                       "Say bye.\n")
    out = tmp_path / "run"
    r = run("--model", str(tiny_model_dir), "--prompts", str(prompts), "--prompts-per-iteration", "5",
            "--eval-prompts", "2", "--iterations", "2", "--max-new-tokens", "6", "--batch-size", "2",
            "--out", str(out), nproc=2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for t in (0, 1):
        got = [json.loads(line) for line in (out / f"iter_{t}" / "pairs.jsonl").read_text().splitlines()]
        stats = json.loads((out / f"iter_{t}" / "data_stats.json").read_text())
        assert stats["prompts"] == 5 and len(got) == stats["kept"] > 0  # both ranks' shares gathered
        assert (out / f"iter_{t}" / "model" / "model.safetensors").exists()
        summary = json.loads((out / f"iter_{t}" / "summary.json").read_text())
        assert summary["eval"]["n"] == 2  # the held-out records: one per rank, gathered, scored by both ranks
    assert json.loads((out / "final" / "summary.json").read_text())["generation"]["n"] == 2
    assert r.stderr.count("the table and metrics.png") == 1 and r.stderr.count("[iter_1] held-out acc") == 1  # rank 0


def test_world_size_must_divide_the_batch(tiny_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records(3)))
    r = run("--model", str(tiny_model_dir), "--pairs", str(pairs), "--batch-size", "3", "--out", str(tmp_path / "o"),
            nproc=2, cwd=tmp_path)
    assert r.returncode != 0
    assert "error: --batch-size 3 is not divisible by the world size 2" in r.stderr
    assert not (tmp_path / "o").exists()


KILL_AT_STEP_2 = """
import os, signal, sys
sys.argv = ["train.py"] + sys.argv[1:]
import train
from sso_mini import trainer
real = trainer.save_resume_state
def save_then_die(path, model, optimizer, step, *rest):
    real(path, model, optimizer, step, *rest)  # (finishes the state of the step before, then writes this one's)
    if step == 3 and int(os.environ.get("RANK", "0")) == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # one rank dies while the state of step 3 is being written
trainer.save_resume_state = save_then_die
sys.exit(train.cli())
"""


def test_bf16_fsdp_with_a_sharded_resume_state_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    """Two ranks under FSDP2's mixed precision (bf16 compute, fp32 shards and reductions) save their resume
    state shard by shard (torch.distributed.checkpoint in the background; each rank's own files, no full gather);
    killed while the state of step 3 is written, the run resumes from step 2's, the last one finished, and ends
    with the weights of the uninterrupted run."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records(16)))
    common = ["--model", str(tiny_model_dir), "--pairs", str(pairs), "--batch-size", "4", "--lr", "1e-3",
              "--save-every", "1", "--autocast"]
    whole = run(*common, "--out", str(tmp_path / "whole"), nproc=2, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_STEP_2)
    cut = tmp_path / "cut"
    killed = run(*common, "--out", str(cut), nproc=2, cwd=tmp_path, script=script)
    assert killed.returncode != 0
    state = cut / "iter_0" / "resume"
    assert json.loads((state / "state.json").read_text()) == {"step": 2, "world_size": 2}
    assert (state / "rank0.json").exists() and (state / "rank1.json").exists()
    assert len(list(state.glob("*.distcp"))) == 2  # one file of shards per rank, none gathered whole
    flipped = tmp_path / "flipped"  # the same state with one bit of rank 1's shards flipped
    shutil.copytree(cut, flipped)
    shard = sorted((flipped / "iter_0" / "resume").glob("*.distcp"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    a = load_file(tmp_path / "whole" / "iter_0" / "model" / "model.safetensors")
    rows = lambda run: [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa
    for folder, damaged in ((cut, False), (flipped, True)):
        resumed = run(*common, "--out", str(folder), "--resume", nproc=2, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        # a damaged state is never used: every rank starts the epoch again
        assert ("do not match the digest recorded" in resumed.stderr) == damaged, resumed.stderr
        b = load_file(folder / "iter_0" / "model" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (damaged, max(
            (a[k] - b[k]).abs().max().item() for k in a), rows(folder.name), rows("whole"))
        assert rows(folder.name) == rows("whole")


FULL_DISK_ON_RANK_1 = """
import sys
sys.argv = ["train.py"] + sys.argv[1:]
import train
from sso_mini import distributed
real, calls = distributed.Ranks.record_files, []
def full_disk(self, *a):
    real(self, *a)
    calls.append(1)
    if self.rank == 1 and len(calls) == 3:  # rank 1 cannot finish the state of step 3
        raise OSError(28, "No space left on device")
distributed.Ranks.record_files = full_disk
sys.exit(train.cli())
"""


def test_a_rank_that_cannot_write_its_resume_state_stops_every_rank_with_its_error(tiny_model_dir, tmp_path):
    """A background save that fails on rank 1 (a full disk) stops both ranks with one error naming rank 1 and the
    cause, printed by rank 0 (which alone prints errors); the state of step 2 stays, and no half-written folder."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records(16)))
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK_ON_RANK_1)
    out = tmp_path / "run"
    r = run("--model", str(tiny_model_dir), "--pairs", str(pairs), "--batch-size", "4", "--save-every", "1",
            "--out", str(out), nproc=2, cwd=tmp_path, script=script)
    assert r.returncode != 0
    assert ("error: the resume state of step 3 was not written (rank 1: [Errno 28] No space left on device)"
            in r.stderr), r.stderr[-3000:]
    state = out / "iter_0" / "resume"
    assert json.loads((state / "state.json").read_text()) == {"step": 2, "world_size": 2}
    assert not (out / "iter_0" / "resume.tmp").exists()


SLOW_RANK_1 = """
import datetime, os, sys, time
sys.argv = ["train.py"] + sys.argv[1:]
import torch.distributed as dist
real_init = dist.init_process_group
def impatient(*a, **k):  # the default group (FSDP's collectives) gives up after 5 s of waiting
    return real_init(*a, **{**k, "timeout": datetime.timedelta(seconds=5)})
dist.init_process_group = impatient
import train
real = train.sample_records
def slow(*a, **k):
    if int(os.environ["RANK"]) == 1:
        time.sleep(12)  # rank 1 samples (or compiles) for longer than the default group waits
    return real(*a, **k)
train.sample_records = slow
sys.exit(train.cli())
"""


def test_a_rank_slow_to_sample_does_not_time_the_others_out(tiny_model_dir, tmp_path):
    """Rank 0 finishes sampling long before rank 1 and waits to gather the records: the wait happens on the gloo
    group for Python objects (distributed.WAIT), not on the default group, which here gives up after 5 s."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a fruit.\nSay hello.\nCount to three.\nName a color.\n")
    script = tmp_path / "slow.py"
    script.write_text(SLOW_RANK_1)
    out = tmp_path / "run"
    r = run("--model", str(tiny_model_dir), "--prompts", str(prompts), "--eval-prompts", "0", "--iterations", "1",
            "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out), nproc=2, cwd=tmp_path, script=script)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "iter_0" / "data_stats.json").read_text())["prompts"] == 4
    assert json.loads((out / "iter_0" / "timing.json").read_text())["sample"] >= 12  # rank 0 waited for rank 1
    assert (out / "iter_0" / "model" / "model.safetensors").exists()
