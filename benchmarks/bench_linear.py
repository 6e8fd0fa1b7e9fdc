"""The CPU matmul of every linear layer while sampling: sso_mini.fast_cpu.onednn (oneDNN) against F.linear (MKL).

    python benchmarks/bench_linear.py          # fp32, 2 threads, SmolLM2-135M's layer shapes

Rows M = 1, 8, 32 are decode steps at those batch sizes; M = 1,100 is a prefill. Each timing
walks through enough distinct weights (~300 MB) that they come from memory, as they do when a
decode step runs the whole model. The sampler runs q, k, v and gate, up as one matmul each
(fast_cpu.fused), so those are the shapes timed.

For one row it also times the other one-row products torch ships (oneDNN on a transposed copy of
the weight, torch.mv) and ends with the batch-1 ceiling: a decode step that read every weight at
the fastest of them and did nothing else, against the memory roofline measured in the same run.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sso_mini.fast_cpu import onednn  # noqa: E402
from bench_generate import read_bandwidth  # noqa: E402  (benchmarks/ is this script's own folder)

# name: (out, in), calls per decode step of SmolLM2-135M (30 layers, tied lm_head)
SHAPES = {"q/k/v fused [960, 576]": ((960, 576), 30), "o [576, 576]": ((576, 576), 30),
          "gate/up fused [3072, 576]": ((3072, 576), 30), "down [576, 1536]": ((576, 1536), 30),
          "lm_head [49152, 576]": ((49152, 576), 1)}


def seconds_per_call(fn, x, weights, repeats):
    for W in weights:  # warm-up: kernels, page faults
        fn(x, W)
    start = time.perf_counter()
    for _ in range(repeats):
        for W in weights:
            fn(x, W)
    return (time.perf_counter() - start) / (repeats * len(weights))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,32,1100")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"fp32, {args.threads} threads, torch {torch.__version__}\n")
    print("| layer | rows | F.linear (MKL) us | ours (oneDNN) us | speed-up | ours GF/s | ours GB/s "
          "| oneDNN, transposed copy us | torch.mv us |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    step_seconds, step_bytes = 0.0, 0
    with torch.inference_mode():  # as while sampling
        for name, ((out_f, in_f), calls) in SHAPES.items():
            weights = [torch.randn(out_f, in_f) for _ in range(max(1, 300 * 2**20 // (4 * out_f * in_f)))]
            for M in map(int, args.rows.split(",")):
                x = torch.randn(M, in_f)
                repeats = max(1, 2000 // (M * len(weights)))
                mkl = seconds_per_call(F.linear, x, weights, repeats)
                ours = seconds_per_call(onednn, x, weights, repeats)
                others = "| - | - |"
                if M == 1:  # the other layouts one row can take; the same dot products
                    copies = [W.t().contiguous() for W in weights]  # [in, out]
                    flipped = seconds_per_call(lambda x, Wt: onednn(x, Wt.t()), x, copies, repeats)
                    mv = seconds_per_call(lambda x, W: torch.mv(W, x[0]), x, weights, repeats)
                    others = f"| {flipped * 1e6:.0f} | {mv * 1e6:.0f} |"
                    step_seconds += calls * min(mkl, ours, flipped, mv)
                    step_bytes += calls * 4 * out_f * in_f
                    del copies
                print(f"| {name} | {M} | {mkl * 1e6:.0f} | {ours * 1e6:.0f} | {mkl / ours:.2f} "
                      f"| {2 * M * out_f * in_f / ours / 1e9:.0f} | {4 * out_f * in_f / ours / 1e9:.1f} {others}",
                      flush=True)
    if step_bytes:
        bandwidth = read_bandwidth(torch.device("cpu"))
        ceiling, roofline = 1 / step_seconds, bandwidth * 1e9 / step_bytes
        print(f"\nbatch-1 ceiling: every weight of a step ({step_bytes / 1e9:.2f} GB) at the fastest product above: "
              f"{step_seconds * 1e3:.1f} ms, {ceiling:.1f} tok/s = {ceiling / roofline:.0%} of the roofline "
              f"({roofline:.1f} tok/s at {bandwidth:.1f} GB/s, a 1 GiB sum)")


if __name__ == "__main__":
    main()
