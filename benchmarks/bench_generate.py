"""Sampling throughput: sso_mini.generate against transformers' `generate`.

    python benchmarks/bench_generate.py                                   # SmolLM2-135M, fp32, 2 CPU threads
    python benchmarks/bench_generate.py --device cuda --dtype bf16 --compile
    python benchmarks/bench_generate.py --preset Qwen2-7B --device cuda --dtype bf16 --compile

Both samplers produce exactly --new-tokens tokens per row (stopping disabled) from the same
weights and left-padded prompts; tokens/s = rows x new tokens / wall time, prefill included,
the best of --repeats runs of each, after a warm-up call (with --compile it compiles the decode
step; its wall time is printed apart).
With --preset the weights are random (shapes from sso_mini.memory.PRESETS). The batch-1 lines
also report the fraction of the memory-bandwidth roofline: every decoded token reads all weights
once, so the ceiling is bandwidth / weight bytes tokens/s, with the bandwidth measured here (the
best of three sums over a 1 GiB tensor, with the same threads) unless --bandwidth-gbs gives it.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sso_mini.checkpoint import fetch_default_model, load_model  # noqa: E402
from sso_mini.memory import PRESETS  # noqa: E402
from sso_mini.generate import generate  # noqa: E402
from sso_mini.model import Transformer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain how a bicycle stays upright while moving.",
    "Give three tips for learning a new language quickly and say why each one works.",
    "Summarise the plot of a detective story in which the butler is innocent.",
    "What are the pros and cons of working from home? Answer in a few bullet points.",
    "Describe the water cycle.",
    "Plan a healthy breakfast for a busy weekday morning, with a shopping list.",
]
MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.7, top_p=0.8)}


def real_models(device, dtype):
    """Our SmolLM2-135M-Instruct and transformers' model read from the same converted folder."""
    from transformers import AutoModelForCausalLM

    model, tok = load_model("SmolLM2-135M-Instruct", dtype=dtype, device=device)
    hf = AutoModelForCausalLM.from_pretrained(fetch_default_model(), dtype=dtype).to(device).eval()
    return model, hf, lambda B: [tok.encode_chat([{"role": "user", "content": QUESTIONS[i % 8] + " " * (i // 8)}])
                                 for i in range(B)]


def preset_models(name, device, dtype):
    """Random weights of a preset's shape: transformers builds them, our model shares the tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = PRESETS[name]
    with tempfile.TemporaryDirectory() as folder:  # through config.json, as a real checkpoint would be read
        (Path(folder) / "config.json").write_text(json.dumps(config.to_hf_dict()))
        hf_config = AutoConfig.from_pretrained(folder)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config).to(dtype).eval()  # small normal init (std 0.02)
    torch.set_default_dtype(torch.float32)
    with torch.device("meta"):
        model = Transformer(config)
    wanted = model.state_dict().keys()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k.removeprefix("model.") in wanted}
    model.load_state_dict(state, assign=True)
    model.reset_rope()
    model.eval()
    g = torch.Generator().manual_seed(0)
    return model, hf, lambda B: [torch.randint(0, config.vocab_size, (20 + 5 * (i % 8),), generator=g).tolist()
                                 for i in range(B)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(model, prompts, new_tokens, mode, compile):
    out = generate(model, prompts, max_new_tokens=new_tokens, stop_ids=(), seed=0, progress=False, compile=compile,
                   **MODES[mode])
    assert all(len(o) == new_tokens for o in out)


def run_hf(hf, prompts, new_tokens, mode, device):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)  # left padding
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = dict(do_sample=True, top_k=0, **MODES[mode]) if mode == "sampled" else dict(do_sample=False)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          eos_token_id=None, pad_token_id=0, **sampling)
    assert out.shape == (len(prompts), T + new_tokens)


def tokens_per_s(fn, rows, new_tokens, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return rows * new_tokens / (time.perf_counter() - t)


def read_bandwidth(device) -> float:
    """GB/s that a sum over a 1 GiB fp32 tensor reads, best of three."""
    x = torch.ones(2**28, device=device)
    best = 0.0
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        x.sum().item()
        best = max(best, x.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--preset", choices=PRESETS, help="random weights of this shape instead of the real SmolLM2")
    ap.add_argument("--batches", type=int, nargs="+", help="default: 1 8 32 (1 32 with --preset)")
    ap.add_argument("--modes", choices=MODES, nargs="+", default=list(MODES))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each sampler, interleaved; the fastest counts")
    ap.add_argument("--compile", action="store_true", help="compile our decode step (CUDA graphs on GPU)")
    ap.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the roofline (default: measured)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    batches = args.batches or ([1, 32] if args.preset else [1, 8, 32])
    if args.preset:
        model, hf, make_prompts = preset_models(args.preset, device, dtype)
    else:
        model, hf, make_prompts = real_models(device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = args.preset or "SmolLM2-135M-Instruct"
    print(f"{name}, {args.dtype}, {device}{', compiled' if args.compile else ''}, "
          f"{args.threads if device.type == 'cpu' else ''}{' threads, ' if device.type == 'cpu' else ''}"
          f"{args.new_tokens} new tokens, best of {args.repeats}, torch {torch.__version__}\n")
    print("| batch | mode | ours tok/s | transformers tok/s | ratio |")
    print("|---:|---|---:|---:|---:|")
    roofline = []
    for B in batches:
        prompts = make_prompts(B)
        for mode in args.modes:
            ours = lambda: run_ours(model, prompts, args.new_tokens, mode, args.compile)  # noqa: E731
            theirs = lambda: run_hf(hf, prompts, args.new_tokens, mode, device)  # noqa: E731
            # warm up: compile (same shapes as the timed run) or just touch every code path
            sync(device)
            first = time.perf_counter()
            run_ours(model, prompts, args.new_tokens if args.compile else 2, mode, args.compile)
            sync(device)
            first = time.perf_counter() - first
            run_hf(hf, prompts, 2, mode, device)
            runs = [(tokens_per_s(ours, B, args.new_tokens, device), tokens_per_s(theirs, B, args.new_tokens, device))
                    for _ in range(args.repeats)]  # interleaved, so a noisy spell hits both alike
            a, b = max(r[0] for r in runs), max(r[1] for r in runs)
            compiled = f" (first call, compiling: {first:.1f} s)" if args.compile else ""
            print(f"| {B} | {mode} | {a:.1f}{compiled} | {b:.1f} | {a / b:.2f} |", flush=True)
            if B == 1:
                roofline.append((mode, a))
    if roofline:
        bandwidth = args.bandwidth_gbs or read_bandwidth(device)
        ceiling = bandwidth * 1e9 / weight_bytes
        # a decode step reads one row of an untied input embedding, so count those bytes out as well
        read = weight_bytes - (0 if model.config.tie_word_embeddings else model.embed_tokens.weight.nbytes)
        print(f"\nweights {weight_bytes / 1e9:.2f} GB; roofline at {bandwidth:.1f} GB/s "
              f"({'given' if args.bandwidth_gbs else 'measured'}) = {ceiling:.1f} tok/s")
        for mode, a in roofline:
            print(f"batch 1 {mode}: {a:.1f} tok/s = {a / ceiling:.0%} of the roofline, {a * read / 1e9 / bandwidth:.0%} "
                  f"counting only the {read / 1e9:.2f} GB a step reads (prefill included)")


if __name__ == "__main__":
    main()
