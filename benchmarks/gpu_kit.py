"""The GPU check kit: what a bare, offline GPU machine needs to measure sso-mini at Qwen2-7B shapes, in one folder
of at most 64 MiB, and the one command that measures there.

    python benchmarks/gpu_kit.py pack KIT                      here, with the package registry: fills KIT
    python benchmarks/gpu_kit.py run KIT OUT                   there: the checkout, KIT, and the torch it has
    python benchmarks/gpu_kit.py run KIT OUT --tiny --device cpu    the dry run, offline (tests/test_gpu_kit.py)

KIT holds the Qwen2 tokenizer, AlpacaEval prompts and a principle set whose one check is our own rule `ended`, so
nothing else is read from the network or the cache, and no package beyond what a PyTorch image has (tokenizers,
safetensors, tqdm, jinja2) is imported: IFEval's checkers stay out (--verifier-share 0). `run` writes
OUT/results.json after every stage, so a run cut short keeps the stages it finished:

  checks     on a GPU, benchmarks/gpu_checks.py's CUDA-only checks (bf16 log-probs, fused AdamW's resume, flex)
  model      synthetic bf16 weights of Qwen2-7B's shapes whose logits are peaked (a nucleus of a few tokens, as a
             trained model's) and whose rows end (1% of the vocabulary are stop ids: answers of ~100 tokens)
  sampling   generate_batched, 256 prompts x 512 new tokens, compiled: the first call (its compile time and the
             graphs dynamo made), then a second (steady-state tokens/s); peak memory
  iteration  train.py, one iteration on 128 prompts (LoRA r=16 above 3B, the memory model's micro-batch): each
             stage's seconds and peak memory, training tokens/s and MFU (bench_packed_train.py's convention)
"""

import argparse
import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import train  # noqa: E402
from bench_packed_train import DENSE_BF16_TFLOPS  # noqa: E402
from make_random_model import qwen2_tokenizer  # noqa: E402
from sso_mini.assets import write_json  # noqa: E402
from sso_mini.checkpoint import load_model, save_model  # noqa: E402
from sso_mini.config import ModelConfig  # noqa: E402
from sso_mini.generate import generate_batched  # noqa: E402
from sso_mini.memory import PRESETS  # noqa: E402
from sso_mini.model import Transformer  # noqa: E402
from sso_mini.records import SAMPLING, default_prompts  # noqa: E402
from sso_mini.tokenizer import Tokenizer, prompt_ids  # noqa: E402

KIT_LIMIT = 64 * 2**20  # bytes: what a device call carries
ENDED = '''# The kit's principle set: brevity without its IFEval word count, so that no rule checker is needed.
features_per_prompt = 1
[[feature]]
name = "Brevity"
good_adjective = "Brief"
bad_adjective = "Long-winded"
meaning = "Answers in a few sentences."
good_principle = "Answer in at most three short sentences."
bad_principle = "Answer at great length, with many digressions."
check = [{rule = "ended"}]
'''
# (sampler rows, new tokens, iteration prompts): the real sizes, and the dry run's
SIZES = {"7b": (256, 512, 128), "tiny": (8, 16, 8)}
# seconds each stage may take at the real size: 8.5 minutes in all, inside a device call's 10
BUDGETS = {"checks": 60, "model": 90, "sampling": 180, "iteration": 180}
TINY = ModelConfig(architecture="Qwen2ForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, qkv_bias=True, vocab_size=151936)


def pack(kit: Path):
    """KIT: the tokenizer, the prompts, the principle set; refused above KIT_LIMIT."""
    qwen2_tokenizer(kit / "tokenizer")
    (kit / "prompts.txt").write_text("\n".join(p.replace("\n", " ") for p in default_prompts()[:512]) + "\n")
    (kit / "ended.toml").write_text(ENDED)
    size = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file())
    if size > KIT_LIMIT:
        raise SystemExit(f"error: {kit} holds {size / 2**20:.1f} MiB, more than a device call carries (64 MiB)")
    print(f"{kit}: {size / 2**20:.1f} MiB")


def synthetic_model(kit: Path, folder: Path, tiny: bool, device) -> Path:
    """A HF folder of Qwen2-7B's shapes (tiny: TINY), bf16 on a GPU: hidden weights ~ N(0, 0.02); the head scaled so
    that logits have a standard deviation of 4 (peaked, as a trained model's); 1% of the vocabulary as stop ids."""
    tokenizer = Tokenizer.from_folder(kit / "tokenizer")
    config = replace(TINY if tiny else PRESETS["Qwen2-7B"], bos_token_id=None, pad_token_id=tokenizer.pad_id)
    g = torch.Generator().manual_seed(0)
    stops = torch.randperm(config.vocab_size, generator=g)[:config.vocab_size // 100].tolist()
    config.eos_token_id = [tokenizer.tk.token_to_id("<|im_end|>"), *stops]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        model.lm_head.weight.normal_(0, 4 / config.hidden_size ** 0.5)  # the final norm's output has |h| ~ sqrt(H)
    model.reset_rope()
    save_model(model, tokenizer, folder)
    return folder


@contextlib.contextmanager
def peak_memory(into: dict, name: str):
    """into[name]: the GPU memory a block peaked at, in GiB (nothing on a CPU)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    yield
    if cuda:
        into[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def sampling(kit: Path, folder: Path, rows: int, new_tokens: int, device) -> dict:
    """The compiled sampler (eager on a CPU) on `rows` prompts: its first call, then the steady state."""
    from torch._dynamo.utils import counters

    model, tokenizer = load_model(folder, device=device)
    prompts = [prompt_ids(tokenizer, "", x) for x in (kit / "prompts.txt").read_text().splitlines()[:rows]]
    out, memory = {"rows": rows, "new_tokens": new_tokens}, {}
    counters.clear()
    for call in ("first", "second"):
        with peak_memory(memory, call):
            start = time.perf_counter()
            answers = generate_batched(model, prompts, batch_size=rows, seed=0, max_new_tokens=new_tokens,
                                       stop_ids=tokenizer.stop_ids, compile=device.type == "cuda", progress=False,
                                       **SAMPLING)
            seconds = time.perf_counter() - start
        tokens = sum(map(len, answers))
        out[call] = {"seconds": round(seconds, 1), "tokens": tokens, "tokens_per_s": round(tokens / seconds),
                     "ended": sum(len(a) < new_tokens for a in answers) / rows}
    out["graphs"] = counters["stats"]["unique_graphs"]
    out["peak_memory_gib"] = memory
    return out


def iteration(kit: Path, folder: Path, prompts: int, new_tokens: int, device, run: Path) -> dict:
    """train.py for one iteration, in this process, with every stage's peak memory recorded."""
    memory, timed = {}, train.timed

    @contextlib.contextmanager
    def timed_with_memory(s, where, stage, what=""):
        with timed(s, where, stage, what), peak_memory(memory, stage):
            yield

    train.timed = timed_with_memory
    try:
        train.main(["--model", str(folder), "--prompts", str(kit / "prompts.txt"), "--principles",
                    str(kit / "ended.toml"), "--verifier-share", "0", "--iterations", "1", "--prompts-per-iteration",
                    str(prompts), "--eval-prompts", "0", "--max-new-tokens", str(new_tokens), "--out", str(run),
                    "--device", device.type, "--no-progress", "--batch-size", str(min(8, prompts // 2))])
    finally:
        train.timed = timed
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rate = statistics.median(r["tokens_per_s"] for r in steps if r["split"] == "train" and r["step"] > 1)
    config, settings = ModelConfig.from_json(folder / "config.json"), json.loads((run / "run.json").read_text())
    plan = json.loads((run / "train_config.json").read_text())  # the micro-batch the memory model planned
    per_token = 4 if settings["lora"] else 6  # LoRA computes no gradient of the frozen weights
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    peak = next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)
    return {"seconds": json.loads((run / "iter_0" / "timing.json").read_text()), "peak_memory_gib": memory,
            "train_tokens_per_s": round(rate), "lora": settings["lora"],
            "tokens_per_micro_batch": plan["tokens_per_micro_batch"],
            "gradient_checkpointing": plan["gradient_checkpointing"],
            "mfu": round(rate * per_token * config.num_parameters / (peak * 1e12), 3) if peak else None}


class OutOfTime(Exception):
    pass


@contextlib.contextmanager
def budget(seconds: int | None):
    """Raise OutOfTime in the block after `seconds` (None: no limit), so that one slow stage (a compile that takes
    minutes) is recorded as such and the next stage still runs."""
    def expire(signum, frame):
        raise OutOfTime(f"stopped after {seconds} s")

    if seconds:
        signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)


def run(kit: Path, out: Path, tiny: bool, device):
    rows, new_tokens, prompts = SIZES["tiny" if tiny else "7b"]
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "size": "tiny" if tiny else "Qwen2-7B shapes"}
    work = Path(tempfile.mkdtemp(prefix="gpu-kit-"))
    folder = work / "model"
    stages = {
        "checks": lambda: gpu_checks() if device.type == "cuda" else "no GPU",
        "model": lambda: str(synthetic_model(kit, folder, tiny, device)),
        "sampling": lambda: sampling(kit, folder, rows, new_tokens, device),
        "iteration": lambda: iteration(kit, folder, prompts, new_tokens, device, work / "run"),
    }
    try:
        for name, stage in stages.items():
            start = time.perf_counter()
            try:
                with budget(None if tiny else BUDGETS[name]):
                    results[name] = stage()
            except (OutOfTime, RuntimeError, ValueError, OSError) as e:  # the next stage may still run
                results[name] = {"failed": f"{type(e).__name__}: {e}"}
            results[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
            write_json(out / "results.json", results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


def gpu_checks() -> dict:
    """benchmarks/gpu_checks.py's checks: {check: {"ok", "detail"}}."""
    import gpu_checks

    for check in gpu_checks.CHECKS:
        try:
            check()
        except Exception as e:  # a check that cannot run is a failed check; the others still run
            gpu_checks.report(check.__name__, False, f"{type(e).__name__}: {e}")
    return gpu_checks.results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["pack", "run"])
    ap.add_argument("kit", type=Path)
    ap.add_argument("out", type=Path, nargs="?", help="run: where results.json goes")
    ap.add_argument("--tiny", action="store_true", help="run: a 2-layer model at the dry run's sizes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.command == "pack":
        pack(args.kit)
    elif args.out is None:
        ap.error("run needs OUT, the folder for results.json")
    else:
        run(args.kit, args.out, args.tiny, torch.device(args.device))


if __name__ == "__main__":
    main()
