"""One SSO training step: ours vs the official code's structure, on the real SmolLM2.

ours:     one forward of the record's 3 prompt-sharing groups packed in one row (each prompt once, its two
          responses under a tree mask: sso_mini.trainer.score), fused lm_head -> log-prob on
          the response positions only, reference log-probs read from the per-iteration cache.
official: three forwards (base, p and n pairs), full [B, T, V] logits -> log_softmax ->
          gather, and a live reference model forward (no grad) for every batch, as
          icip-cas/SSO's concatenated_forward + compute_reference_log_probs do.

Both compute the same loss and gradients; each variant runs in a fresh subprocess so
peak memory (ru_maxrss, minus the baseline after loading) is its own.

Sequences 2k and 2k+1 share their prompt (x, x+, x-), as in an SSO record.

    python benchmarks/bench_train_step.py [--tokens 256] [--prompt-tokens 64] [--steps 3] [--threads 2] [--bf16]

fp32 by default; --bf16 runs both under bf16 autocast (what the trainer does where bf16 is native).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sso_mini.checkpoint import load_model  # noqa: E402
from sso_mini.losses import sso_loss  # noqa: E402
from sso_mini.trainer import score  # noqa: E402


def batch(T, vocab, prompt_len):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (6, T), generator=g)
    ids[1::2, :prompt_len] = ids[0::2, :prompt_len]  # pairs share a prompt
    attention = torch.ones(6, T, dtype=torch.long)
    response = torch.zeros(6, T, dtype=torch.bool)
    response[:, prompt_len:] = True
    return ids, attention, response


def full_logit_logprobs(model, ids, attention, response):
    """The usual way: full logits, log_softmax over the vocabulary, gather, mask, sum."""
    logits = model(ids, attention_mask=attention)[:, :-1].float()  # [B, T-1, V]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, T-1]
    mask = response[:, 1:]
    return (logp * mask).sum(-1), mask.sum(-1)


def shared_groups(ids, prompt_len):
    """The trainer's layout: (prompt, [response a, response b]) for each of the 3 pairs."""
    return [(ids[k, :prompt_len].tolist(), [ids[k, prompt_len:].tolist(), ids[k + 1, prompt_len:].tolist()])
            for k in (0, 2, 4)]


def step_ours(model, groups, ref, bf16):
    logp, n, _ = score(model, groups, bf16)
    loss, _ = sso_loss(logp.view(1, 6), ref, n.view(1, 6))
    loss.backward()


def step_official(model, ref_model, ids, attention, response, bf16):
    logps, ref_logps, counts = [], [], []
    for pair in (slice(0, 2), slice(2, 4), slice(4, 6)):  # three separate forwards
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            lp, n = full_logit_logprobs(model, ids[pair], attention[pair], response[pair])
            with torch.no_grad():  # a live reference forward per batch
                rp, _ = full_logit_logprobs(ref_model, ids[pair], attention[pair], response[pair])
        logps.append(lp), ref_logps.append(rp), counts.append(n)
    loss, _ = sso_loss(torch.cat(logps).view(1, 6), torch.cat(ref_logps).view(1, 6), torch.cat(counts).view(1, 6))
    loss.backward()


def child(variant, T, prompt_len, steps, threads, bf16):
    torch.set_num_threads(threads)
    model, _ = load_model("SmolLM2-135M-Instruct")
    model.train()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the policy's own weights are not counted
    ref_model = load_model("SmolLM2-135M-Instruct")[0] if variant == "official" else None  # a second copy
    ids, attention, response = batch(T, model.config.vocab_size, prompt_len)
    groups = shared_groups(ids, prompt_len)
    with torch.no_grad():
        ref = full_logit_logprobs(model, ids, attention, response)[0].view(1, 6)  # the cached reference
    if variant == "ours":
        fn = lambda: step_ours(model, groups, ref, bf16)  # noqa: E731
    else:
        fn = lambda: step_official(model, ref_model, ids, attention, response, bf16)  # noqa: E731
    fn()  # warm-up
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
        model.zero_grad(set_to_none=True)
    dt = (time.perf_counter() - t0) / steps
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # MB (ru_maxrss is KiB)
    print(json.dumps({"variant": variant, "s_per_step": dt, "tokens_per_s": 6 * T / dt, "peak_mb": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sequence (prompt + response)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="of which prompt (shared by each pair)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for both (fp32 master weights)")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.prompt_tokens, args.steps, args.threads, args.bf16)
    results = {}
    for variant in ("ours", "official"):
        cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--prompt-tokens",
               str(args.prompt_tokens), "--steps", str(args.steps), "--threads", str(args.threads)]
        cmd += ["--bf16"] * args.bf16
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    o, r = results["ours"], results["official"]
    print(f"SmolLM2-135M, 6 sequences x {args.tokens} tokens ({args.prompt_tokens} of prompt, shared by each pair), "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.threads} threads, {args.steps} steps")
    print("| variant | s/step | tokens/s | peak MB (above the policy weights) |\n|---|---|---|---|")
    for name, v in (("ours (1 forward: 3 prompt-sharing groups in one packed row, fused log-probs, cached ref)", o),
                    ("official structure (3 forwards, full logits, live ref)", r)):
        print(f"| {name} | {v['s_per_step']:.2f} | {v['tokens_per_s']:.0f} | {v['peak_mb']:.0f} |")
    print(f"\nspeed-up ours/official: {o['tokens_per_s'] / r['tokens_per_s']:.2f}x; "
          f"peak memory ours/official: {o['peak_mb'] / max(r['peak_mb'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
