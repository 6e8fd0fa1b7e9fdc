"""The CPU matmul of every linear layer: sso_mini.model.project (oneDNN) against F.linear (MKL).

    python benchmarks/bench_linear.py          # fp32, 2 threads, SmolLM2-135M's layer shapes

Rows M = 1, 8, 32 are decode steps at those batch sizes; M = 1,100 is a prefill. Each timing
walks through enough distinct weights (~300 MB) that they come from memory, as they do when a
decode step runs the whole model.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sso_mini.model import project  # noqa: E402

SHAPES = {"gate/up [1536, 576]": (1536, 576), "down [576, 1536]": (576, 1536), "q/o [576, 576]": (576, 576),
          "lm_head [49152, 576]": (49152, 576)}


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
    print("| layer | rows | F.linear (MKL) us | ours (oneDNN) us | speed-up | ours GF/s |")
    print("|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():  # where model.project takes oneDNN (sampling)
        for name, (out_f, in_f) in SHAPES.items():
            weights = [torch.randn(out_f, in_f) for _ in range(max(1, 300 * 2**20 // (4 * out_f * in_f)))]
            for M in map(int, args.rows.split(",")):
                x = torch.randn(M, in_f)
                repeats = max(1, 2000 // (M * len(weights)))
                mkl = seconds_per_call(F.linear, x, weights, repeats)
                ours = seconds_per_call(project, x, weights, repeats)
                print(f"| {name} | {M} | {mkl * 1e6:.0f} | {ours * 1e6:.0f} | {mkl / ours:.2f} "
                      f"| {2 * M * out_f * in_f / ours / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
