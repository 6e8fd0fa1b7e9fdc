"""Training throughput of packed micro-batches: records packed up to a token budget against one record per forward.

    python benchmarks/bench_packed_train.py                                   # SmolLM2-135M (real weights), CPU
    python benchmarks/bench_packed_train.py --device cuda --preset Qwen2-7B --lora-rank 16 --records 32

Every record is an SSO record's six sequences as three prompt-sharing groups (sso_mini.batches): the plain
prompt x, and x+ and x- with a principle in front (--principle-tokens), each followed by two responses of
--response-tokens (+-25%, so rows differ in length). Token ids are random; only the shapes matter here.
Both variants run the trainer's own step (trainer.score -> losses.sso_loss -> backward) on the same records:

  per-record: one record per forward, attention through one dense mask per group (the path before packing)
  packed:     as many records per forward as fit in --tokens-per-micro-batch (batches.micro_batches); on
              CUDA attention goes through one flex_attention block mask per row (model.packed_attention_mask)

Printed per variant: training tokens/s (tokens of the packed rows, forward + backward), model FLOP
utilisation and peak memory (CUDA). MFU counts 6 N FLOPs per token for full fine-tuning and 4 N with LoRA
(forward 2 N, backward through the frozen weights' activations 2 N; the adapters' own FLOPs are left
out), N = the parameters that multiply every token (the blocks and the output head), attention's own
FLOPs not counted, against --peak-tflops (default: the GPU's dense bf16 peak where it is known; on
the CPU, a large matmul timed here in the step's dtype).
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sso_mini.batches import collate_groups, micro_batches, row_length  # noqa: E402
from sso_mini.checkpoint import load_model  # noqa: E402
from sso_mini.memory import PRESETS  # noqa: E402
from sso_mini.lora import apply_lora  # noqa: E402
from sso_mini.losses import sso_loss  # noqa: E402
from sso_mini.memory import micro_batch_tokens, plan_bytes  # noqa: E402
from sso_mini.model import Transformer  # noqa: E402
from sso_mini.logprobs import packed_logprobs  # noqa: E402
from sso_mini.trainer import bf16_is_native  # noqa: E402

DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # NVIDIA datasheets, dense (no sparsity)


def make_records(n, vocab, prompt, principle, response, seed=0):
    """n records as (prompt ids, [two responses]) groups: x, then x+ and x- with a principle in front."""
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(vocab) for _ in range(k)]

    def answer():
        return ids(rng.randint(response * 3 // 4, response * 5 // 4))

    records = []
    for _ in range(n):
        x, y_pos, y_neg, y_raw = ids(prompt), answer(), answer(), answer()
        records.append([(x, [y_pos, y_neg]), (ids(principle) + x, [y_pos, y_neg]), (ids(principle) + x, [y_raw, y_pos])])
    return records


def build_model(args, device):
    if args.preset is None:
        model, _ = load_model("SmolLM2-135M-Instruct", device=device)
    else:
        with torch.device(device):
            model = Transformer(PRESETS[args.preset]).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        model.reset_rope()
    if args.lora_rank:
        apply_lora(model, rank=args.lora_rank)
    return model.train()


def counted_params(model) -> int:
    """Parameters every token multiplies: the blocks' weights and the output head (not the embedding lookup)."""
    c = model.config
    per_layer = sum(p.numel() for n, p in model.layers[0].named_parameters() if "lora" not in n)
    return c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size


def matmul_tflops(device, dtype, n=4096, repeats=3) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e12


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(model, records, micro, device, mixed, flex):
    """One optimizer step's forwards and backwards over `micro` (lists of record indices): tokens, seconds."""
    ref = torch.zeros(len(records), 6, device=device)  # a cached reference pass: its values do not change the cost
    sync(device)
    t, tokens = time.perf_counter(), 0
    for mb in micro:
        groups = [g for i in mb for g in records[i]]
        batch = collate_groups(groups, device)  # one packed row, as trainer.score lays it out
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            logp, n = packed_logprobs(model, batch, flex=flex)
        ntok = batch["input_ids"].numel()
        loss, _ = sso_loss(logp.float().view(len(mb), 6), ref[mb], n.view(len(mb), 6))
        (loss * len(mb) / len(records)).backward()
        tokens += ntok
    sync(device)
    model.zero_grad(set_to_none=True)
    return tokens, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", choices=PRESETS, help="random weights of this shape (default: the real SmolLM2)")
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full fine-tuning)")
    ap.add_argument("--records", type=int, default=8, help="records per optimizer step")
    ap.add_argument("--prompt-tokens", type=int, default=60)
    ap.add_argument("--principle-tokens", type=int, default=300)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--tokens-per-micro-batch", type=int,
                    help="packed budget (default: 16384 on the CPU; on CUDA what sso_mini/memory.py plans for the "
                         "GPU's free memory, with gradient checkpointing where the plan needs it)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant, after one warm-up step")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: see above)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args, device)
    mixed = bf16_is_native(device)  # bf16 autocast where it is native, as the trainer does
    records = make_records(args.records, model.config.vocab_size, args.prompt_tokens, args.principle_tokens,
                           args.response_tokens)
    tokens = {i: row_length(r) for i, r in enumerate(records)}
    if args.tokens_per_micro_batch is None:  # as train.py plans it (settings.planned_config): the longest record
        args.tokens_per_micro_batch, model.gradient_checkpointing = (16384, False) if device.type != "cuda" else \
            micro_batch_tokens(model.config, plan_bytes(device), args.lora_rank or None, record=max(tokens.values()))
    variants = {"per-record": ([[i] for i in tokens], False),
                "packed": (micro_batches(list(tokens), tokens, 1, args.tokens_per_micro_batch), None)}
    name = f"{args.preset or 'SmolLM2-135M-Instruct'}{f' LoRA r={args.lora_rank}' if args.lora_rank else ''}"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_tflops or next((v for k, v in DENSE_BF16_TFLOPS.items() if gpu and k in gpu), None)
    if peak is None:
        peak = matmul_tflops(device, torch.bfloat16 if mixed else torch.float32)
    N, per_token = counted_params(model), 4 if args.lora_rank else 6
    print(f"{name}, {gpu or 'CPU'}, {'bf16 autocast' if mixed else 'fp32'}, {args.records} records per step "
          f"(~{sum(tokens.values()) // args.records} tokens each), budget {args.tokens_per_micro_batch} tokens"
          f"{' with gradient checkpointing' if model.gradient_checkpointing else ''}, "
          f"{'' if gpu else f'{args.threads} threads, '}MFU at {per_token} N = {per_token * N / 1e9:.2f} GFLOP/token "
          f"against {peak:.1f} TFLOPS, torch {torch.__version__}\n")
    print("| variant | forwards per step | tokens/s | MFU | peak memory GB |\n|---|---:|---:|---:|---:|")
    rates = {}
    for label, (micro, flex) in variants.items():
        run(model, records, micro, device, mixed, flex)  # warm-up (on CUDA: compiles flex_attention)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = [run(model, records, micro, device, mixed, flex) for _ in range(args.steps)]
        rates[label] = sum(n for n, _ in timed) / sum(s for _, s in timed)
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"
        mfu = rates[label] * per_token * N / (peak * 1e12)
        print(f"| {label} | {len(micro)} | {rates[label]:.0f} | {mfu:.1%} | {memory} |", flush=True)
    print(f"\npacked / per-record: {rates['packed'] / rates['per-record']:.2f}x")


if __name__ == "__main__":
    main()
