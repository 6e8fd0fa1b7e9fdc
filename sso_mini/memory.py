"""The GPU memory plan: how many tokens of packed records one training forward can take, and whether
gradient checkpointing is needed, from the model's shapes and the GPU's free memory.

Planned from the longest record --cutoff allows when a run starts (first_plan), then again from
each iteration's longest sampled record (planned_config). A planning model, not a measurement of the allocator:
weights, gradients and AdamW state from the parameter counts, activations from what each block saves for its
backward (checked against a count of the tensors autograd saves, tests/test_lora.py), and one chunk of the
log-prob kernel.

    python -m sso_mini.memory      the memory table of docs/scale.md for PRESETS, the shapes of real models
"""

from dataclasses import replace

import torch

from .batches import record_groups, row_length
from .config import ModelConfig
from .lora import TARGETS


# Shapes of the models people run SSO on (from their published config.json files).
# Used for random-weight benchmarks at real sizes and for memory budgets.
PRESETS = {
    "SmolLM2-135M": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
        tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    "Qwen2.5-0.5B": ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, qkv_bias=True,
        max_position_embeddings=32768,
    ),
    "Qwen2-7B": ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, qkv_bias=True,
        max_position_embeddings=32768,
    ),
    "Llama-3.1-8B": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072,
    ),
}


def lora_param_count(config: ModelConfig, rank: int, targets=TARGETS) -> int:
    """r * (in + out) per adapted projection, summed over layers."""
    H, I = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
              "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    return config.num_hidden_layers * sum(rank * sum(shapes[t]) for t in targets)


def activation_bytes_per_token(config: ModelConfig, checkpointing: bool, dtype_bytes: int = 2,
                               full: bool = False) -> int:
    """What training saves for the backward, per token of a micro-batch, over all layers. Per block: the two
    RMSNorm inputs in fp32 (the norm computes in fp32) and in `dtype_bytes` their outputs, q, k, v after RoPE,
    attention's output and its copy that o_proj reads, the MLP's gate, up, silu(gate) and product (which
    dominate: 4 x intermediate); a full fine-tune (`full`) also keeps the normalised inputs the norm weights'
    gradients read. Attention keeps no [T, T] matrix (flash and flex attention recompute it). With
    checkpointing a block keeps only its input, and one block's worth is live while it is recomputed."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_block = 2 * 4 * H + dtype_bytes * (2 * H + q + 2 * kv + 2 * q + 4 * I + (2 * H if full else 0))
    return L * H * dtype_bytes + per_block if checkpointing else L * per_block


def memory_budget(config: ModelConfig, lora_rank: int | None = None, dtype_bytes: int = 2,
                  tokens: int = 6 * 1024, logprob_chunk: int = 1024, checkpointing: bool = True,
                  n_ranks: int = 1) -> dict:
    """Training memory per GPU in bytes, from the shapes: a planning model, checked against a count of the
    tensors autograd saves (tests/test_lora.py), not a measurement of the allocator.

    Full fine-tune (lora_rank=None): AdamW with fp32 master weights, fp32 gradients and two fp32
    moments = 16 bytes per parameter, split over n_ranks by FSDP; compute runs in bf16 under autocast.
    LoRA: the frozen base in `dtype_bytes`, fp32 adapters, their gradients and moments.
    Activations: `tokens` per micro-batch (activation_bytes_per_token). Log-prob kernel: one chunk
    of fp32 logits and its gradient, [logprob_chunk, V] x 2 (the token chunk logprobs.py works in).
    """
    N = config.num_parameters
    if lora_rank is None:
        trainable, weights = N / n_ranks, 4 * N / n_ranks
    else:
        trainable = lora_param_count(config, lora_rank)
        weights = dtype_bytes * N + 4 * trainable
    budget = {
        "params": N,
        "trainable_params": trainable,
        "weights": weights,
        "gradients": 4 * trainable,
        "optimizer": 8 * trainable,
        "activations": tokens * activation_bytes_per_token(config, checkpointing, dtype_bytes, full=lora_rank is None),
        "logprob_chunk": 2 * min(logprob_chunk, tokens) * config.vocab_size * 4,
    }
    budget["total"] = sum(v for k, v in budget.items() if k not in ("params", "trainable_params"))
    return budget


GPU_MEMORY_SHARE = 0.85  # of the free memory the budget may plan for: the rest for the CUDA context, the
# allocator's fragmentation, attention's workspace and the sampler's cache (freed before training, but cached)
MAX_TOKENS_PER_MICRO_BATCH = 16384  # enough work per forward to keep a GPU busy at 7B


def free_bytes(device) -> int:
    """What the GPU can still give: its free memory plus what torch's allocator holds but does not use
    (cached blocks, the sampler's freed cache): free + reserved - allocated."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def plan_bytes(device) -> int:
    """The memory a training plan counts on: free_bytes plus what this process has allocated (the plan counts the
    weights, gradients and optimizer state itself, loaded yet or not)."""
    return free_bytes(device) + torch.cuda.memory_allocated(device)


SAMPLER_ROWS = (8, 512)  # a GPU's decode step is bound by reading the weights until well past 128 rows


def sampler_rows(config: ModelConfig, free: int, max_len: int, element_size: int) -> int:
    """Rows per sampling batch: as many as half of `free` bytes holds (KV cache of max_len slots, and the
    step's fp32 logits and noise, per row), a power of two in SAMPLER_ROWS."""
    c = config
    per_row = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * max_len * element_size
    per_row += 4 * 4 * c.vocab_size  # logits, probabilities and their copies (noise: NUCLEUS_CANDIDATES, or V)
    rows = free // 2 // per_row
    return max(SAMPLER_ROWS[0], min(SAMPLER_ROWS[1], 1 << max(int(rows).bit_length() - 1, 0)))


def micro_batch_tokens(config: ModelConfig, free_bytes: int, lora_rank: int | None = None, n_ranks: int = 1,
                       record: int = 6 * 2048) -> tuple[int, bool]:
    """(tokens per micro-batch, gradient checkpointing) for a GPU with `free_bytes` to plan with: the largest power of
    two up to MAX_TOKENS_PER_MICRO_BATCH whose memory_budget fits GPU_MEMORY_SHARE of it, without
    checkpointing if that still holds one whole record (a record is never split; `record`: the tokens of the
    longest packed record, or before sampling its bound, the sequences its loss reads x --cutoff), else with
    checkpointing. ValueError if not even that fits."""
    for checkpointing in (False, True):
        tokens = MAX_TOKENS_PER_MICRO_BATCH
        while tokens >= 1 and memory_budget(config, lora_rank, tokens=tokens, checkpointing=checkpointing,
                                            n_ranks=n_ranks)["total"] > GPU_MEMORY_SHARE * free_bytes:
            tokens //= 2
        if tokens >= min(record, MAX_TOKENS_PER_MICRO_BATCH):
            return tokens, checkpointing
    need = memory_budget(config, lora_rank, tokens=record, checkpointing=True, n_ranks=n_ranks)["total"]
    raise ValueError(f"training this model needs about {need / 2**30:.0f} GiB for one record of {record} tokens "
                     f"with gradient checkpointing; the GPU has {free_bytes / 2**30:.0f} GiB free "
                     f"(allowed: a smaller --cutoff, LoRA (--lora), or more GPUs under torchrun)")


def first_plan(args, config: ModelConfig, lora: bool, ranks, longest: int) -> tuple[int, bool, dict]:
    """A run's plan before anything is sampled, from the longest record --cutoff allows (`longest` tokens) and the
    GPU's free memory (rank 0's, so every rank plans alike): (tokens per micro-batch, gradient checkpointing, the
    memory plan planned_config plans each iteration's micro-batches from)."""
    free = ranks.on_rank0(lambda: plan_bytes(torch.device(args.device)))
    # checkpointing: None, planned; a bool, --(no-)gradient-checkpointing
    memory_plan = dict(config=config, free_bytes=free, lora_rank=args.lora_rank if lora else None, n_ranks=ranks.size,
                       checkpointing=args.gradient_checkpointing)
    return *plan(memory_plan, longest), memory_plan


def plan(memory_plan: dict, record: int) -> tuple[int, bool]:
    """micro_batch_tokens for a record of `record` tokens, under memory_plan (its inputs, and "checkpointing": the
    flag's value, which stays when given)."""
    inputs = dict(memory_plan)
    given = inputs.pop("checkpointing")
    tokens, checkpointing = micro_batch_tokens(**inputs, record=record)
    return tokens, checkpointing if given is None else given


def planned_config(cfg, memory_plan: dict, records: list, tokenizer):
    """The TrainConfig cfg for these records, its micro-batches planned again from the longest record sampled (real
    records are far shorter than --cutoff's bound, so fewer need checkpointing). memory_plan: micro_batch_tokens's
    inputs, and "checkpointing", the flag's value (None: planned here too)."""
    longest = max(row_length(record_groups(tokenizer, r, cfg.cutoff, columns=cfg.columns)) for r in records)
    tokens, checkpointing = plan(memory_plan, longest)
    return replace(cfg, tokens_per_micro_batch=tokens, gradient_checkpointing=checkpointing)


def main():
    """`python -m sso_mini.memory`: the memory table of docs/scale.md for the presets."""
    gib = 2**30
    print("| model | mode | GPU | tokens per micro-batch | checkpointing | weights | grads | AdamW | activations | "
          "log-prob chunk | total (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("Qwen2.5-0.5B", "Qwen2-7B", "Llama-3.1-8B"):
        for mode, rank, n_ranks in (("LoRA r=16, bf16", 16, 1), ("full, fp32 master, 8 ranks", None, 8)):
            for gpu, free in (("80 GB", 79 * gib), ("141 GB", 139 * gib)):  # what the device reports free
                tokens, ckpt = micro_batch_tokens(PRESETS[name], free, rank, n_ranks)
                b = memory_budget(PRESETS[name], lora_rank=rank, tokens=tokens, checkpointing=ckpt, n_ranks=n_ranks)
                cols = " | ".join(f"{b[k] / gib:.1f}" for k in
                                  ("weights", "gradients", "optimizer", "activations", "logprob_chunk", "total"))
                print(f"| {name} ({b['params'] / 1e9:.2f}B) | {mode} | {gpu} | {tokens} | {'on' if ckpt else 'off'} "
                      f"| {cols} |")


if __name__ == "__main__":
    main()
