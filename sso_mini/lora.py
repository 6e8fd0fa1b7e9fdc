"""LoRA: train a 7B model on one GPU by learning low-rank corrections to frozen weights.

A target projection y = x W^T + b becomes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: [r, in], B: [out, r]

with W, b frozen and only A, B trained. B starts at zero, so the adapted model starts
exactly equal to the base model; that also makes the frozen base the SSO reference model
(`adapters_disabled`), so no second copy of the weights is ever held.

Names. `LoRALinear` holds the wrapped layer's own `weight` and `bias` Parameters under
the same attribute names, so every base tensor keeps its state-dict key
(`layers.0.self_attn.q_proj.weight`); the adapters add `...q_proj.lora_A` / `.lora_B`.

Saving. `save_model` writes `model.state_dict()` as is, so it must be given a plain
model: `save_model(merge_lora(model), tokenizer, path)`. `merge_lora` returns a new
Transformer with W + (alpha/r) B A folded in (in the base dtype) and the original keys;
the adapted model is untouched and training can go on. For resuming, `lora_state_dict`
is the adapters alone (a few MB), a plain dict of tensors for safetensors.

Precision. Adapters are fp32 master weights (small optimizer updates are not lost to
bf16 rounding) but the adapter matmuls run in the activation dtype, as autocast would:
the weights are cast, not the input, so no fp32 copy of each activation is stored.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .model import Transformer, project

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen model.Projection plus a trainable low-rank update (alpha / r) * B @ A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # [out, in], the same Parameter: keys and storage unchanged
        self.bias = base.bias  # [out] or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init: U(-1/sqrt(in), 1/sqrt(in))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # set by adapters_disabled(): compute the base layer only

    def forward(self, x):
        y = project(x, self.weight)  # [..., out], exactly the base layer (model.Projection: bias added after)
        if self.bias is not None:
            y = y + self.bias
        if self.disabled:
            return y
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # fp32 masters, compute in x's dtype
        delta = F.linear(F.linear(self.dropout(x), A), B)  # [..., in] -> [..., r] -> [..., out]
        return y + self.scaling * delta

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A in the base dtype (summed in fp32)."""
        delta = self.lora_B.detach().float() @ self.lora_A.detach().float()  # [out, in]
        return (self.weight.detach().float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear for every adapted projection, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: Transformer, rank: int = 16, alpha: float = 32, dropout: float = 0.0,
               targets=TARGETS) -> Transformer:
    """Wrap the target projections in place with LoRALinear and freeze everything else.

    Embeddings, norms, lm_head and the base weights stop taking gradients; only the
    adapters (fp32, on the base weights' device) are trainable. Returns the model.
    """
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target module(s) {unknown or list(targets)}: valid names are "
                         f"{', '.join(TARGETS)}")
    if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters (merge_lora first to start new ones)")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return model


def lora_parameters(model: nn.Module):
    """The trainable adapter Parameters (give these, and only these, to the optimizer)."""
    for m in lora_modules(model).values():
        yield m.lora_A
        yield m.lora_B


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, the model computes exactly the base model: the SSO reference, for free.

    Use it under torch.no_grad(): with gradient checkpointing a backward run after the
    block would recompute the forward with the adapters back on.
    """
    modules = list(lora_modules(model).values())
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(modules, before):
            m.disabled = d


def merged_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The plain Transformer's state dict (original keys, base dtype) with adapters folded in.

    Only the adapted weights are new tensors; every other entry shares storage with the model.
    """
    adapted = lora_modules(model)
    state = {}
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        state[key] = adapted[module].merged_weight() if module in adapted and leaf == "weight" else t
    return state


def merge_lora(model: Transformer) -> Transformer:
    """A new plain Transformer equal to the adapted model; ready for `save_model`.

    It shares the untouched tensors (embeddings, norms, biases) with `model`, so it
    costs one extra copy of the adapted projections only. The result is in eval mode.
    """
    return Transformer.from_state_dict(model.config, merged_state_dict(model)).eval()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only, by state-dict key (for resume checkpoints via safetensors)."""
    return {k: t.detach().contiguous() for k, t in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]):
    """Copy adapters saved by `lora_state_dict` into a model with the same LoRA setup."""
    own = lora_state_dict(model)
    if not own:
        raise ValueError("the model has no LoRA adapters: call apply_lora before loading adapter weights")
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA state dict does not match the model: missing {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{' ...' if len(unexpected) > 3 else ''}")
    for k, t in state.items():  # check everything first: a refused load leaves the model as it was
        if t.shape != own[k].shape:
            raise ValueError(f"LoRA tensor {k} has shape {tuple(t.shape)}, the model's is "
                             f"{tuple(own[k].shape)} (different rank?)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in state.items():
            params[k].copy_(t)  # into the fp32 adapter on the model's device


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


def micro_batch_tokens(config: ModelConfig, free_bytes: int, lora_rank: int | None = None, n_ranks: int = 1,
                       cutoff: int = 2048) -> tuple[int, bool]:
    """(tokens per micro-batch, gradient checkpointing) for a GPU with `free_bytes` free: the largest power of
    two up to MAX_TOKENS_PER_MICRO_BATCH whose memory_budget fits GPU_MEMORY_SHARE of it, without
    checkpointing if that still holds one whole record (a record is never split, and its packed row is
    at most 6 sequences of `cutoff` tokens), else with checkpointing. ValueError if not even that fits."""
    record = 6 * cutoff
    for checkpointing in (False, True):
        tokens = MAX_TOKENS_PER_MICRO_BATCH
        while tokens >= 1 and memory_budget(config, lora_rank, tokens=tokens, checkpointing=checkpointing,
                                            n_ranks=n_ranks)["total"] > GPU_MEMORY_SHARE * free_bytes:
            tokens //= 2
        if tokens >= min(record, MAX_TOKENS_PER_MICRO_BATCH):
            return tokens, checkpointing
    need = memory_budget(config, lora_rank, tokens=record, checkpointing=True, n_ranks=n_ranks)["total"]
    raise ValueError(f"training this model needs about {need / 2**30:.0f} GiB for one record of up to {record} tokens "
                     f"(--cutoff {cutoff}) with gradient checkpointing; the GPU has {free_bytes / 2**30:.0f} GiB free "
                     f"(allowed: a smaller --cutoff, LoRA (--lora), or more GPUs under torchrun)")


def main():
    """`python -m sso_mini.lora`: the README's memory table for the presets."""
    from .config import PRESETS

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
