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

from .model import Transformer

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
        y = F.linear(x, self.weight)  # [..., out], exactly the base layer (model.Projection: bias added after)
        if self.bias is not None:
            y = y + self.bias
        if self.disabled:
            return y
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # fp32 masters, compute in x's dtype
        down = F.linear(self.dropout(x), A)  # [..., in] -> [..., r]
        # y + scaling * down @ B.T as one addmm: the scale and the add ride on the matmul, no extra pass over y
        out = torch.addmm(y.reshape(-1, y.size(-1)), down.reshape(-1, down.size(-1)).to(y.dtype), B.t().to(y.dtype),
                          alpha=self.scaling)
        return out.view(y.shape)

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
