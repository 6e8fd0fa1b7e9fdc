"""The decoder-only transformer shared by Llama-3.x and Qwen2/2.5.

    tokens -> embed -> L x [x + attn(norm(x)), x + mlp(norm(x))] -> norm -> lm_head

Every numeric choice follows the Hugging Face reference so that a checkpoint gives the same logits here as in
`transformers`: RMSNorm in fp32, rotate-half RoPE (llama3 frequency scaling), grouped-query attention, SwiGLU MLP.
Parameter names are HF's minus the leading "model." so checkpoints load without a mapping table.
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
    """Per-pair rotation frequencies theta^(-2i/d). llama3 scaling (Llama-3.1) keeps high frequencies, divides low
    ones by `factor` and blends in between, so short-range order is kept while long contexts fit."""
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
    """A layer's cache while sampling, k and v [rows, Hkv, slots, D]: contiguous views of one flat storage that stays
    between batches (allocated again only for a batch that needs more), so that a batch can shrink and the next
    take its place without moving memory: a compiled decode step and its CUDA graphs meet the same cache every
    call. A slot holds stale keys until written; the mask never lets a query read one."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        self.n_kv, self.head_dim = n_kv_heads, head_dim
        self.k_storage = torch.zeros(batch_size * n_kv_heads * max_len * head_dim, dtype=dtype, device=device)
        self.v_storage = torch.zeros_like(self.k_storage)
        self.register_buffer("k", None, persistent=False)
        self.register_buffer("v", None, persistent=False)
        self.view(batch_size, max_len)

    def holds(self, rows: int, slots: int, like: torch.Tensor) -> bool:
        """Can the storage take rows x slots of `like`'s dtype and device?"""
        s = self.k_storage
        fits = rows * self.n_kv * slots * self.head_dim <= s.numel()
        return fits and (s.dtype, s.device) == (like.dtype, like.device)

    def view(self, rows: int, slots: int, first: int = 0):
        """k and v become views of rows first .. first + rows - 1 of `slots` slots each (row i at offset
        i * Hkv * slots * D of the storage)."""
        size = self.n_kv * slots * self.head_dim  # one row
        self.k, self.v = (s[first * size:(first + rows) * size].view(rows, self.n_kv, slots, self.head_dim)
                          for s in (self.k_storage, self.v_storage))

    def select_rows(self, index: torch.Tensor):
        """In place: row i of the cache becomes its row index[i] (len(index) rows: drop, repeat or add rows)."""
        k, v = self.k[index], self.v[index]  # copies first: the rows they come from may be overwritten
        self.view(len(index), k.size(2))
        self.k.copy_(k)
        self.v.copy_(v)

    def update(self, input_pos, k, v):
        """Write k, v [B, Hkv, T, D] into slots input_pos [T] of every row; return the whole cache."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def attend(q, k, v, mask):
    """q [B, Hq, T, D] attends over k, v [B, Hkv, S, D] -> [B, Hq, T, D]. mask: a flex_attention BlockMask, a boolean
    [B, 1, T, S] (True: may attend), or a packed row's [1, 1, Tg, Tg] masks, piece g attending within itself. The rep
    query heads sharing a kv head become rep x T rows of it, so k, v are read as stored (not copied per decode step)."""
    if isinstance(mask, BlockMask):  # (under autocast RoPE's fp32 tables promote q and k; flex wants one dtype)
        return compiled_flex_attention()(q.to(v.dtype), k.to(v.dtype), v, block_mask=mask, enable_gqa=True)
    pieces = mask if isinstance(mask, list) else [mask]
    sizes = [m.size(-2) for m in pieces]
    split = (lambda t: t.split(sizes, dim=2)) if len(pieces) > 1 else (lambda t: [t])
    out = []
    for qi, ki, vi, m in zip(split(q), split(k), split(v), pieces):
        B, Hq, T, D = qi.shape
        rep = Hq // ki.size(1)
        qi = qi.reshape(B, ki.size(1), rep * T, D)  # rows: (head in group, time)
        m = m.repeat(1, 1, rep, 1) if T > 1 else m  # [B, 1, rep*T, S] in the same row order (T = 1 broadcasts)
        out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=m).reshape(B, Hq, T, D))
    return torch.cat(out, dim=2)


class Projection(nn.Linear):
    """nn.Linear with the bias added after the matmul (same math): in compiled one-token decode this gives a fused
    Triton reduction instead of addmm's slower cuBLAS split-K on Qwen2's small k/v weights (benchmarks/README.md)."""

    def forward(self, x):
        y = F.linear(x, self.weight)
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

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = k.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if input_pos is not None:  # sampling: this step's keys and values join the cache, then all are read
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, Hkv, S_cache, D]
            k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]  # the first S slots: those the mask covers
        y = attend(q, k, v, mask)  # [B, Hq, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def qkv(self, x):
        """q, k, v of x [B, T, H] (while sampling on a CPU, sso_mini/fast_cpu.py runs the three as one matmul)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.gate_proj = Projection(H, I, bias=False)
        self.up_proj = Projection(H, I, bias=False)
        self.down_proj = Projection(I, H, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU

    def gate_up(self, x):
        """The gate and up projections of x (while sampling on a CPU, sso_mini/fast_cpu.py runs both as one matmul)."""
        return self.gate_proj(x), self.up_proj(x)


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
    """[B, T] 1/0 padding mask -> [B, 1, T, T] boolean causal mask over real keys. Each query also sees itself, so a
    padding row never has zero keys (SDPA would return NaN there; padding rows' outputs are ignored anyway)."""
    B, T = attention_mask.shape
    device = attention_mask.device
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # [T, T]
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    diag = torch.eye(T, dtype=torch.bool, device=device)
    return (causal & keys) | diag  # [B, 1, T, T]


def may_attend(document, branch, q, kv):
    """The packed row's attention rule for token indices q (queries) and kv (keys): same group (document), not in the
    future, and the key is the group's prompt (branch 0) or the query's own response. Both attention paths use it."""
    return (document[q] == document[kv]) & (kv <= q) & ((branch[kv] == 0) | (branch[kv] == branch[q]))


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process: uncompiled it runs a dense reference implementation."""
    return torch.compile(flex_attention)


def packed_attention_mask(document, branch, flex: bool | None = None):
    """The attention of a packed row (batches.collate_groups: document, branch [1, N]) under may_attend, as `attend`
    takes it. flex (default: on CUDA): a BlockMask recording which 128 x 128 tiles are empty, full or partial, so one
    kernel runs the whole row skipping empty tiles, with no [N, N] tensor. Otherwise one dense [1, 1, Tg, Tg] mask per
    group, one SDPA call each: flex_attention has no backward on the CPU, so training there takes this path."""
    doc, br = document[0], branch[0]  # [N]
    if doc.is_cuda if flex is None else flex:
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
        tied = config.tie_word_embeddings  # the output matrix is embed_tokens' (lm_head_weight)
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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

    def hidden_states(self, input_ids, position_ids, mask, input_pos=None):
        """Final-norm hidden states [B, T, H] of input_ids [B, T] at positions position_ids [B, T]; mask: see `attend`.
        input_pos [T]: with a KV cache, the slots these tokens are written to (the mask covers the first S slots)."""
        x = self.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos)
        return self.norm(x)

    def logits(self, h):
        """[..., H] hidden states -> [..., V] logits (while sampling on a CPU, sso_mini/fast_cpu.py uses oneDNN)."""
        return F.linear(h, self.lm_head_weight)

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        """Logits [B, T, V] of left- or right-padded rows (attention_mask [B, T], 1 = a real token; positions count
        real tokens by default), as transformers computes them. Training never calls this (it would build [B, T, V])."""
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        position_ids = position_ids_from_mask(attention_mask) if position_ids is None else position_ids
        return self.logits(self.hidden_states(input_ids, position_ids, padding_causal_mask(attention_mask)))

    def setup_cache(self, batch_size: int, max_len: int):
        """Every layer's KV cache: a view of batch_size rows x max_len slots (for generate.py), of a storage that stays
        between calls (allocated again only when this call needs more than it holds)."""
        w = self.embed_tokens.weight
        for layer in self.layers:
            a, cache = layer.self_attn, layer.self_attn.kv_cache
            if cache is None or not cache.holds(batch_size, max_len, w):
                a.kv_cache = cache = None  # the old storage goes before the new one is allocated
                a.kv_cache = KVCache(batch_size, a.n_kv, max_len, a.head_dim, w.dtype, w.device)
            a.kv_cache.view(batch_size, max_len)

    def select_cache_rows(self, index: torch.Tensor):
        """Every layer's cache keeps rows `index`, in that order (see KVCache.select_rows)."""
        for layer in self.layers:
            layer.self_attn.kv_cache.select_rows(index)

    def clear_cache(self):
        """Free the KV caches' memory (training needs it)."""
        for layer in self.layers:
            layer.self_attn.kv_cache = None
