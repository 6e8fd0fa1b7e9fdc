"""The decoder-only transformer shared by Llama-3.x and Qwen2/2.5.

    tokens -> embed -> L x [x + attn(norm(x)), x + mlp(norm(x))] -> norm -> lm_head

Every numeric choice follows the Hugging Face reference so that a checkpoint gives the
same logits here as in `transformers`: RMSNorm in fp32, rotate-half RoPE (with the
llama3 long-context frequency scaling), grouped-query attention, SwiGLU MLP. Parameter
names are HF's minus the leading "model." so checkpoints load without a mapping table.

Two callers shape the interface:
- training/scoring calls `hidden_states(...)` on padded batches, or on one packed row of
  sequences (a dense mask per piece, or one flex_attention block mask on a GPU:
  packed_attention_mask), and never asks for full logits (see logprobs.py);
- sampling (generate.py) attaches a static KVCache to each attention layer and feeds
  `input_pos`, the cache slots being written, plus a ready-made 4-D boolean mask (or, for
  the prefill, a packed row whose pieces fill consecutive cache rows).
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)  # normalise in fp32, scale in the weight's dtype (as HF)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies theta^(-2i/d), with llama3 scaling when configured.

    llama3 scaling (Llama-3.1) leaves high frequencies alone, divides low ones by `factor`
    and blends smoothly in between, so short-range order is kept while long contexts fit.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # [d/2]
    s = config.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """A preallocated per-layer cache; decode writes one slot per step, shapes never change."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v, rows=None):
        # input_pos: [T] slots; k, v: [B, Hkv, T, D]
        # rows: [T] for a packed prefill (B = 1): token t goes to cache row rows[t], slot input_pos[t]
        if rows is None:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:
            self.k[rows, :, input_pos] = k[0].transpose(0, 1)  # [T, Hkv, D]
            self.v[rows, :, input_pos] = v[0].transpose(0, 1)
        return self.k, self.v


def cached_attention(q, k, v, mask):
    """Grouped-query attention over the cache without copying it per query head.

    The `rep` query heads that share a kv head become `rep` x T query rows of that head, so
    k and v are read as stored; one decode step would otherwise copy the whole cache.
    q [B, Hq, T, D], k/v [B, Hkv, S, D], mask [B, 1, T, S] -> [B, Hq, T, D].
    """
    B, Hq, T, D = q.shape
    rep = Hq // k.size(1)
    q = q.reshape(B, k.size(1), rep * T, D)  # rows: (head in group, time)
    if T > 1:
        mask = mask.repeat(1, 1, rep, 1)  # [B, 1, rep*T, S] in the same row order (T = 1 broadcasts)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, Hq, T, D)


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def project(x, weight):
    """x @ weight.T (F.linear without bias); when sampling on the CPU, through oneDNN.

    Why: torch sends fp32 matmuls on the CPU to MKL, whose kernels for few rows (one decode
    row per sequence) run far below what the memory and the vector units allow on the AMD
    CPUs this was measured on. oneDNN, which torch also ships, picks its kernels from the
    CPU's own features (benchmarks/bench_linear.py measures the two). It is reached through
    the op that torch.compile's CPU backend emits for linear layers. Only under inference mode
    (generate): scoring keeps F.linear, so reference log-probs are bit-identical to the
    training forward at the same weights (rewards start at exactly 0), and logits to
    transformers'.
    """
    if (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and torch.is_inference_mode_enabled()):  # (compiled code picks its own matmuls)
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


class Projection(nn.Linear):
    """nn.Linear with the bias added after the matmul instead of inside it (the same math).

    Why: in compiled one-token decode on a GPU, a bias-free one-row matmul becomes a Triton
    reduction with the bias add fused into it, while addmm goes to a cuBLAS split-K call that
    reads Qwen2's small k/v weights at a fraction of HBM bandwidth (a profile put it at a
    large share of a Qwen2-7B decode step for a small share of its bytes; benchmarks/README.md).
    On the CPU the matmul goes through `project` above."""

    def forward(self, x):
        y = project(x, self.weight)
        return y if self.bias is None else y + self.bias


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        H = config.hidden_size
        self.q_proj = Projection(H, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = Projection(H, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.v_proj = Projection(H, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.o_proj = Projection(self.n_heads * self.head_dim, H, bias=config.o_bias)
        self.kv_cache: KVCache | None = None
        self.qkv: tuple | None = None  # (weight, bias) of q, k, v in one (generate.fused_projections)

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        if self.qkv is not None:  # one matmul instead of three
            weight, bias = self.qkv
            qkv = project(x, weight) if bias is None else project(x, weight) + bias
            kv_width = self.n_kv * self.head_dim
            q, k, v = qkv.split([self.n_heads * self.head_dim, kv_width, kv_width], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = k.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_cache is not None and isinstance(mask, list):  # packed prefill: piece i fills cache row r0 + i
            rows, slots = input_pos  # [T] each: the cache row and slot every token is written to
            pieces, r0 = [m.size(-2) for m in mask], int(rows[0])
            k, v = self.kv_cache.update(slots, k, v, rows)  # [B, Hkv, Tmax, D]
            S = mask[0].size(-1)
            y = torch.cat([cached_attention(qi, k[r:r + 1, :, :S], v[r:r + 1, :, :S], m)
                           for r, qi, m in zip(range(r0, r0 + len(mask)), q.split(pieces, 2), mask)], dim=2)
        elif self.kv_cache is not None:  # sampling: keys are the first S cache slots, S = the mask's length
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, Hkv, Tmax, D]
            S = mask.size(-1)
            y = cached_attention(q, k[:, :, :S], v[:, :, :S], mask)  # [B, Hq, T, D]
        else:
            if isinstance(mask, BlockMask):  # a packed row on a GPU: one fused kernel skips the empty blocks
                # (under autocast RoPE's fp32 tables promote q and k; flex_attention, unlike SDPA, is no
                # autocast op and wants one dtype)
                q, k = q.to(v.dtype), k.to(v.dtype)
                y = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=True)  # [B, Hq, T, D]
            else:
                rep = self.n_heads // self.n_kv  # grouped-query: each kv head serves `rep` query heads
                k = k.repeat_interleave(rep, dim=1)  # [B, Hq, S, D]
                v = v.repeat_interleave(rep, dim=1)
                if isinstance(mask, list):  # a packed row: each piece attends within itself only
                    pieces = [m.size(-2) for m in mask]
                    y = torch.cat([F.scaled_dot_product_attention(qi, ki, vi, attn_mask=m) for qi, ki, vi, m in
                                   zip(q.split(pieces, 2), k.split(pieces, 2), v.split(pieces, 2), mask)], dim=2)
                else:
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # [B, Hq, T, D]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.gate_proj = Projection(H, I, bias=False)
        self.up_proj = Projection(H, I, bias=False)
        self.down_proj = Projection(I, H, bias=False)
        self.gate_up: torch.Tensor | None = None  # gate and up weights in one (generate.fused_projections)

    def forward(self, x):
        if self.gate_up is not None:
            gate, up = project(x, self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def padding_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 1/0 padding mask -> [B, 1, T, T] boolean causal mask over real keys.

    Each query may also see itself, so a padding row never has zero keys (SDPA would
    return NaN there); padding rows' outputs are ignored anyway.
    """
    B, T = attention_mask.shape
    device = attention_mask.device
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # [T, T]
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    diag = torch.eye(T, dtype=torch.bool, device=device)
    return (causal & keys) | diag  # [B, 1, T, T]


def may_attend(document, branch, q, kv):
    """The packed row's attention rule, for token indices q (queries) and kv (keys) of one row:
    same group (document), not in the future, and the key is the group's prompt (branch 0) or
    the query's own response. Both attention paths read it (packed_attention_mask)."""
    return (document[q] == document[kv]) & (kv <= q) & ((branch[kv] == 0) | (branch[kv] == branch[q]))


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process: uncompiled it runs a dense reference implementation."""
    return torch.compile(flex_attention)


def packed_attention_mask(document, branch, flex: bool | None = None):
    """The attention of a packed row (batches.collate_groups: document, branch [1, N]) in the form
    hidden_states takes, with may_attend as the one rule.

    flex (default: on CUDA): a BlockMask for flex_attention. It records which 128 x 128 tiles are
    empty, full or partial, so one kernel runs the whole row at flash-attention speed, skipping the
    empty tiles, with no [N, N] tensor anywhere. Otherwise one dense [1, 1, Tg, Tg] mask per group:
    sum(Tg^2) booleans, one SDPA call per group. flex_attention has no backward on the CPU, so
    training there takes this path.
    """
    doc, br = document[0], branch[0]  # [N]
    if flex if flex is not None else doc.is_cuda:
        def mask_mod(b, h, q, kv):
            return may_attend(doc, br, q, kv)

        N = doc.numel()
        return create_block_mask(mask_mod, None, None, N, N, device=doc.device, _compile=doc.is_cuda)
    sizes = torch.unique_consecutive(doc, return_counts=True)[1].tolist()
    masks = []
    for idx in torch.arange(doc.numel(), device=doc.device).split(sizes):  # [Tg] token indices of a group
        masks.append(may_attend(doc, br, idx[:, None], idx[None, :])[None, None])  # [1, 1, Tg, Tg]
    return masks


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts each row; positions count real tokens only: [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = False

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output matrix [V, H]: the embedding itself when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict) -> "Transformer":
        """A model holding `state`'s tensors as they are: built on the meta device, no init, no copy."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        model.reset_rope()
        return model

    def reset_rope(self):
        """Recompute the RoPE buffer (needed after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.embed_tokens.weight.device)

    def rope(self, position_ids, dtype):
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D] (broadcast over heads)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, input_pos=None):
        """Final-norm hidden states [B, T, H].

        attention_mask: None (all real, causal), a [B, T] 1/0 padding mask, a ready
        [B, 1, T, S] boolean mask (sampling with a KV cache, S = cache length), or a packed row
        (B = 1, packed_attention_mask): a list of [1, 1, Tg, Tg] boolean masks, consecutive
        pieces of Tg tokens each attending within itself only, so sequences of different lengths
        share a forward with no padding (the matmuls see real tokens only; attention costs
        sum(Tg^2)), or the same pattern as a flex_attention BlockMask.
        With a KV cache, a packed row is a prefill: input_pos [2, T] names each token's cache row
        and slot, the pieces fill consecutive rows (piece i: row r0 + i), and the [1, 1, Tg, S]
        mask of a piece reads its row's first S slots.
        """
        B, T = input_ids.shape
        if attention_mask is None:
            mask = None  # plain causal: SDPA's is_causal path
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        elif isinstance(attention_mask, BlockMask):
            mask = attention_mask
            if B != 1 or mask.seq_lengths != (T, T) or position_ids is None or self.layers[0].self_attn.kv_cache:
                raise ValueError("a block mask needs one packed row (B = 1) of its length, explicit position_ids "
                                 "and no KV cache")
        elif isinstance(attention_mask, list):
            mask = attention_mask
            if B != 1 or sum(m.size(-2) for m in mask) != T or position_ids is None:
                raise ValueError("packed masks need one row (B = 1) they tile exactly, and explicit position_ids")
        elif attention_mask.dim() == 2:
            mask = padding_causal_mask(attention_mask)
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)
        else:
            mask = attention_mask
            if position_ids is None:
                raise ValueError("a 4-D attention mask needs explicit position_ids")
        x = self.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = self.rope(position_ids, x.dtype)
        if mask is None and input_pos is not None:
            raise ValueError("sampling with a KV cache needs a [B, 1, T, S] attention mask")
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos)
        return self.norm(x)

    def forward(self, input_ids, position_ids=None, attention_mask=None, input_pos=None):
        """Logits [B, T, V]. Training never calls this (it would materialise [B, T, V])."""
        h = self.hidden_states(input_ids, position_ids, attention_mask, input_pos)
        return project(h, self.lm_head_weight)

    def setup_cache(self, batch_size: int, max_len: int):
        """Attach a static KV cache of `max_len` slots to every layer (for generate.py)."""
        w = self.embed_tokens.weight
        for layer in self.layers:
            a = layer.self_attn
            a.kv_cache = KVCache(batch_size, a.n_kv, max_len, a.head_dim, w.dtype, w.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None
