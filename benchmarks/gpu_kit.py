"""The GPU check kit: what a bare, offline GPU machine needs to measure sso-mini at Qwen2-7B shapes, in one folder
of at most 64 MiB, and the one command that measures there.

    python benchmarks/gpu_kit.py pack KIT                      here, with the package registry: fills KIT
    python benchmarks/gpu_kit.py run KIT OUT                   there: the checkout, KIT, and the torch it has
    python benchmarks/gpu_kit.py run KIT OUT --tiny --device cpu    the dry run, offline (tests/test_gpu_kit.py)

KIT holds the Qwen2 tokenizer, AlpacaEval prompts and a principle set whose one check is our own rule `ended`, so
nothing else is read from the network or the cache, and no package beyond what a PyTorch image has (tokenizers,
safetensors, tqdm, jinja2) is imported: IFEval's checkers stay out (--verifier-share 0). `run` writes
OUT/results.json after every stage, each run in a process of its own (a fresh GPU) under its own time limit, so a
stage that fails or runs out of time is recorded with what it measured, and the next still runs:

  checks     on a GPU, benchmarks/gpu_checks.py's CUDA-only checks (bf16 log-probs, fused AdamW's resume, flex)
  model      synthetic bf16 weights of Qwen2-7B's shapes whose logits are peaked (a nucleus of a few tokens, as a
             trained model's) and whose rows end (1% of the vocabulary are stop ids: answers of ~100 tokens)
  sampling   generate_batched, 256 prompts x 512 new tokens, compiled: the first call (its compile time and the
             graphs dynamo made), then a second (steady-state tokens/s, recompiles); peak memory
  iteration  train.py, one iteration on 64 prompts (LoRA r=16 above 3B, the memory model's micro-batch): each
             phase's seconds and peak memory, training tokens/s and MFU (bench_packed_train.py's convention)
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_packed_train import DENSE_BF16_TFLOPS, counted_params  # noqa: E402
from make_random_model import qwen2_tokenizer  # noqa: E402
from sso_mini.assets import write_json  # noqa: E402
from sso_mini.checkpoint import load_model, save_model  # noqa: E402
from sso_mini.compiled import GRAPHS  # noqa: E402
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
SIZES = {"7b": (256, 512, 64), "tiny": (8, 16, 8)}
# seconds each stage's process may take at the real size: 9 minutes in all, inside a device call's 10
BUDGETS = {"checks": 45, "model": 75, "sampling": 180, "iteration": 240}
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
    """A HF folder of Qwen2-7B's shapes (tiny: TINY), bf16 on a GPU: matrices ~ N(0, 0.02), biases 0, norms 1; the
    head scaled so that logits have a standard deviation of 4 (peaked, as a trained model's); 1% of the vocabulary
    as stop ids, so that rows end."""
    tokenizer = Tokenizer.from_folder(kit / "tokenizer")
    config = replace(TINY if tiny else PRESETS["Qwen2-7B"], bos_token_id=None, pad_token_id=tokenizer.pad_id)
    g = torch.Generator().manual_seed(0)
    stops = torch.randperm(config.vocab_size, generator=g)[:config.vocab_size // 100].tolist()
    config.eos_token_id = [tokenizer.tk.token_to_id("<|im_end|>"), *stops]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)  # built in it, never in fp32
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0 if "norm" in name else 0.0)
        model.lm_head.weight.normal_(0, 4 / config.hidden_size ** 0.5)  # the final norm's output has |h| ~ sqrt(H)
    model.reset_rope()
    save_model(model, tokenizer, folder)
    return folder


@contextlib.contextmanager
def peak_memory(into: dict, name: str):
    """into[name]: the GPU memory a block peaked at, in GiB (nothing on a CPU), also when the block fails."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        if cuda:
            into[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def sampling(kit: Path, work: Path, tiny: bool, device) -> dict:
    """The compiled sampler (eager on a CPU) on a batch of prompts: its first call, then the steady state, each with
    the graphs dynamo has compiled so far (a run's: compiled.GRAPHS), whether the KV cache's storage moved, and
    inductor's CUDA graph counters."""
    from torch._dynamo.utils import counters

    rows, new_tokens, _ = SIZES["tiny" if tiny else "7b"]
    model, tokenizer = load_model(work / "model", device=device)
    prompts = [prompt_ids(tokenizer, "", x) for x in (kit / "prompts.txt").read_text().splitlines()[:rows]]
    out, memory = {"rows": rows, "new_tokens": new_tokens, "graphs_expected": GRAPHS}, {}
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
                     "ended": sum(len(a) < new_tokens for a in answers) / rows,
                     "graphs": counters["stats"]["unique_graphs"],
                     "cache_storage": model.layers[0].self_attn.kv_cache.k_storage.data_ptr(),
                     "cudagraph_counters": {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}}
    out["cache_moved"] = out["first"].pop("cache_storage") != out["second"].pop("cache_storage")
    out["peak_memory_gib"] = memory
    return out


def iteration(kit: Path, work: Path, tiny: bool, device) -> dict:
    """train.py for one iteration, in a process of its own (its output goes to this stage's log); each phase's
    seconds and, on a GPU, peak memory, as train.py records them (partial)."""
    _, new_tokens, prompts = SIZES["tiny" if tiny else "7b"]
    run = work / "run"
    subprocess.run([sys.executable, str(HERE.parent / "train.py"), "--model", str(work / "model"), "--prompts",
                    str(kit / "prompts.txt"), "--principles", str(kit / "ended.toml"), "--verifier-share", "0",
                    "--iterations", "1", "--prompts-per-iteration", str(prompts), "--eval-prompts", "0",
                    "--max-new-tokens", str(new_tokens), "--out", str(run), "--device", device.type, "--no-progress",
                    "--batch-size", "4" if tiny else "8"], check=True)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in steps if r["split"] == "train"]
    rate = statistics.median(rates[1:] or rates)  # the first step warms up
    with torch.device("meta"):  # shapes only: the parameters a token multiplies
        model = Transformer(ModelConfig.from_json(work / "model" / "config.json"))
    settings, plan = (json.loads((run / name).read_text()) for name in ("run.json", "train_config.json"))
    per_token = 4 if settings["lora"] else 6  # LoRA computes no gradient of the frozen weights
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    peak = next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)
    return {"peak_memory_gib": {}, **partial(work), "train_tokens_per_s": round(rate), "lora": settings["lora"],
            "tokens_per_micro_batch": plan["tokens_per_micro_batch"],
            "gradient_checkpointing": plan["gradient_checkpointing"],
            "mfu": round(rate * per_token * counted_params(model) / (peak * 1e12), 3) if peak else None}


def gpu_checks(kit: Path, work: Path, tiny: bool, device) -> dict:
    """benchmarks/gpu_checks.py's checks: {check: {"ok", "detail"}}."""
    if device.type != "cuda":
        return {"skipped": "no GPU"}
    import gpu_checks

    for check in gpu_checks.CHECKS:
        try:
            check()
        except Exception as e:  # a check that cannot run is a failed check; the others still run
            gpu_checks.report(check.__name__, False, f"{type(e).__name__}: {e}")
    return gpu_checks.results


STAGES = {"checks": gpu_checks, "model": lambda kit, work, tiny, device: str(synthetic_model(kit, work / "model",
                                                                                                 tiny, device)),
          "sampling": sampling, "iteration": iteration}


def run(kit: Path, out: Path, tiny: bool, device, budgets: dict | None = None):
    """Each stage in a process of its own (a fresh GPU, its own time limit); OUT/results.json after each, OUT/NAME.log
    its output. budgets: {stage: seconds} (None: no limits)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "size": "tiny" if tiny else "Qwen2-7B shapes"}
    work = Path(tempfile.mkdtemp(prefix="gpu-kit-"))
    try:
        for name in STAGES:
            command = [sys.executable, __file__, "stage", str(kit), str(work), "--name", name, "--device", device.type,
                       *(["--tiny"] if tiny else [])]
            start, limit = time.perf_counter(), (budgets or {}).get(name)
            # a session of its own: out of time, the stage goes with every process it started (train.py, compile
            # workers), which would otherwise hold its output open and keep this waiting
            stage = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
            try:
                log, failed = stage.communicate(timeout=limit)[0], stage.wait() != 0 and f"exit {stage.returncode}"
            except subprocess.TimeoutExpired:
                kill_group(stage)
                log, failed = stage.communicate()[0], f"stopped after {limit} s"
            except BaseException:  # Ctrl-C or a kill of the kit: the stage in its own session would not hear it
                kill_group(stage)
                raise
            (out / f"{name}.log").write_text(log)
            result = work / f"{name}.json"
            results[name] = json.loads(result.read_text()) if result.exists() and not failed else \
                {"failed": failed, "log_tail": log[-1500:], **partial(work)}
            results[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
            write_json(out / "results.json", results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


def kill_group(process):
    """Kill `process` and every process in its group (it leads one: start_new_session)."""
    with contextlib.suppress(ProcessLookupError):  # (the group may have ended meanwhile)
        os.killpg(process.pid, signal.SIGKILL)


def partial(work: Path) -> dict:
    """What train.py's iteration has measured (so far, if stopped): its phases' seconds and peak memory."""
    folder = work / "run" / "iter_0"
    files = {"seconds": folder / "timing.json", "peak_memory_gib": folder / "memory.json"}
    return {k: json.loads(p.read_text()) for k, p in files.items() if p.exists()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["pack", "run", "stage"])
    ap.add_argument("kit", type=Path)
    ap.add_argument("out", type=Path, nargs="?", help="run: where results.json goes; stage: the work folder")
    ap.add_argument("--tiny", action="store_true", help="run: a 2-layer model at the dry run's sizes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", choices=list(STAGES), help="stage: which one (run starts each in its own process)")
    args = ap.parse_args()
    if args.command == "pack":
        pack(args.kit)
    elif args.out is None:
        ap.error(f"{args.command} needs OUT")
    elif args.command == "run":
        run(args.kit, args.out, args.tiny, torch.device(args.device), None if args.tiny else BUDGETS)
    else:
        result = STAGES[args.name](args.kit, args.out, args.tiny, torch.device(args.device))
        write_json(args.out / f"{args.name}.json", result)


if __name__ == "__main__":
    main()
