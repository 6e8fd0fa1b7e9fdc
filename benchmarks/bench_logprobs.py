"""Fused chunked log-probs vs the naive formula: forward+backward time and peak memory.

    python benchmarks/bench_logprobs.py                          # CPU, fp32, N in {1024, 4096}
    python benchmarks/bench_logprobs.py --device cuda --dtype bf16  # GPU, N in {8192, 32768}

Three ways to get log p(target) for N tokens over a V = 151,936 vocabulary (Qwen2's), H = 896:
  ours       sso_mini.logprobs.token_logprobs (vocab chunks, recomputed in the backward)
  naive      log_softmax(h @ W.T).gather(target)
  selective  logits = h @ W.T; logits.gather(target) - logsumexp(logits)
Each case runs in a fresh subprocess so one case's allocator state cannot hide another's peak.
CPU peak = growth of ru_maxrss (a high-water mark) over its value once the inputs exist;
GPU peak = torch.cuda.max_memory_allocated over the memory the inputs take.
Both count the gradients (W.grad alone is V * H * 4 bytes = 545 MB in fp32).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sso_mini.logprobs import token_logprobs  # noqa: E402

V, H = 151_936, 896
METHODS = ("ours", "naive", "selective")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive(h, W, t):
    return torch.log_softmax((h @ W.T).float(), dim=-1).gather(1, t[:, None]).squeeze(1)  # [N]


def selective(h, W, t):
    logits = (h @ W.T).float()  # [N, V]
    return logits.gather(1, t[:, None]).squeeze(1) - logits.logsumexp(dim=-1)  # [N]


FNS = {"ours": token_logprobs, "naive": naive, "selective": selective}


def child(method, n, device, dtype, threads):
    """One case in this process: print {"time_s", "peak_mb"} as JSON (or {"error"})."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = DTYPES[dtype]
    # in-place scaling: a temporary here would raise the ru_maxrss baseline and hide the peak
    h = torch.randn(n, H, device=device).mul_(0.5).to(dtype).requires_grad_()
    W = torch.randn(V, H, device=device).mul_(0.05).to(dtype).requires_grad_()
    t = torch.randint(0, V, (n,), device=device)
    fn = FNS[method]

    def step():
        fn(h, W, t).sum().backward()
        h.grad = W.grad = None

    cuda = device == "cuda"
    try:
        if cuda:
            step()  # warm up kernels and cuBLAS at full size; the peak is reset below
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            fn(h[:8].detach(), W[:1024].detach(), t[:8] % 1024)  # load the kernels, cheaply
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        print(json.dumps({"error": "OOM"}))
        return
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"time_s": elapsed, "peak_mb": peak / 2**20}))


def run_case(method, n, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--sizes", str(n),
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="fp32 on CPU, bf16 on CUDA")
    p.add_argument("--sizes", default=None, help="comma-separated N (tokens)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=1, help="fresh runs per case; the fastest counts")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    sizes = [int(s) for s in (args.sizes or ("8192,32768" if args.device == "cuda" else "1024,4096")).split(",")]
    if args.child:
        return child(args.child, sizes[0], args.device, args.dtype, args.threads)

    print(f"V={V}, H={H}, {args.device}, {args.dtype}"
          + (f", {args.threads} threads" if args.device == "cpu" else "") + f", best of {args.repeats}\n")
    print("| N | ours s | naive s | selective s | ours MB | naive MB | selective MB "
          "| time ours/naive | time sel/naive | mem ours/naive | mem sel/naive |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        res = {m: [] for m in METHODS}
        for _ in range(args.repeats):  # interleaved, so background load hits every method alike
            for m in METHODS:
                res[m].append(run_case(m, n, args))
        best = {}
        for m in METHODS:
            ok = [r for r in res[m] if "error" not in r]
            best[m] = {"time_s": min(r["time_s"] for r in ok), "peak_mb": max(r["peak_mb"] for r in ok)} \
                if ok else None
            if not ok:
                print(f"<!-- {m} N={n}: {res[m][0]['error']} -->")

        def cell(m, key, fmt):
            return fmt.format(best[m][key]) if best[m] else "failed"

        def ratio(m, key):
            return f"{best[m][key] / best['naive'][key]:.2f}" if best[m] and best["naive"] else "-"

        print(f"| {n} | {cell('ours', 'time_s', '{:.2f}')} | {cell('naive', 'time_s', '{:.2f}')} "
              f"| {cell('selective', 'time_s', '{:.2f}')} | {cell('ours', 'peak_mb', '{:.0f}')} "
              f"| {cell('naive', 'peak_mb', '{:.0f}')} | {cell('selective', 'peak_mb', '{:.0f}')} "
              f"| {ratio('ours', 'time_s')} | {ratio('selective', 'time_s')} "
              f"| {ratio('ours', 'peak_mb')} | {ratio('selective', 'peak_mb')} |", flush=True)


if __name__ == "__main__":
    main()
