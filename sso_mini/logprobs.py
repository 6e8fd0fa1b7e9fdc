"""Log-probabilities of target tokens without ever building [tokens, vocab] logits.

Preference losses need log pi(y_t | y_<t), one entry per row of log_softmax(h @ W.T); the naive formula builds the
[N, V] logits, several times over in autograd (2.5 GB each at N = 4096, V = 151,936). Here the lm_head matmul, the
log-softmax and the gather are one autograd Function that walks the vocabulary in chunks, keeps one [N, chunk] fp32
block alive at a time, saves just the inputs and the per-token logsumexp, and recomputes each chunk in the backward.
"""

import torch

from .model import packed_attention_mask

IGNORE_INDEX = -100
CHUNK_BYTES = 32 * 2**20  # budget of one fp32 [N, chunk] logits block


def default_chunk_size(n_tokens: int, vocab_size: int) -> int:
    """Vocab rows per chunk so that a [n_tokens, chunk] fp32 block stays within CHUNK_BYTES."""
    chunk = CHUNK_BYTES // (4 * max(n_tokens, 1))
    chunk = max(1024, chunk // 128 * 128)  # thinner matmuls run far below peak, on GPU above all
    return min(chunk, vocab_size)


def _on_tensor_cores(hidden, weight) -> bool:
    """Whether half-precision operands can enter the matmuls as they are: a product of two bf16 (or fp16) numbers is
    exact in fp32 and cuBLAS sums in fp32 when asked for an fp32 result (out_dtype), so on CUDA the logits equal those
    of upcasting first, at tensor-core speed (benchmarks/README.md). CPU has no such matmul: upcast there."""
    return hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and weight.dtype == hidden.dtype


def _mm(a, b, out, accumulate=False):
    """out = a @ b (or out += a @ b), summed in out.dtype; writes into a reused buffer."""
    kw = {} if a.dtype == out.dtype else {"out_dtype": out.dtype}  # half operands on tensor cores
    return torch.addmm(out, a, b, out=out, **kw) if accumulate else torch.mm(a, b, out=out, **kw)


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[i, targets[i]], chunked over the vocabulary.

    Why vocab chunks rather than token chunks: the softmax normaliser composes exactly across chunks (logsumexp of
    the chunks' logsumexps), so the forward stays one pass; in the backward, with the logsumexp known, one matmul over
    all N tokens yields a vocab chunk's rows of grad_weight complete, written once into the output. Token chunks
    would read-modify-write the whole [V, H] grad_weight once per chunk (slower; benchmarks/README.md), with an extra
    fp32 [V, H] accumulator for bf16 weights; here only the small grad_hidden [N, H] accumulates. One [N, chunk]
    buffer serves every chunk: fresh allocations that large would be page-faulted in again each time on CPU."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        (N, _), V = hidden.shape, weight.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16 -> fp32; fp64 stays
        fast = _on_tensor_cores(hidden, weight)
        h = hidden if fast else hidden.to(dtype)  # [N, H] matmul operand
        valid = targets != IGNORE_INDEX  # [N]
        t = torch.where(valid, targets, 0)  # [N] ignored rows score token 0, masked below
        target_logit = (h.to(dtype) * weight[t].to(dtype)).sum(-1)  # [N]
        buf = h.new_empty(N * min(chunk_size, V), dtype=dtype)
        chunk_lse = []
        for start in range(0, V, chunk_size):
            w = weight[start:start + chunk_size].to(h.dtype)  # [C, H]
            z = _mm(h, w.T, out=buf[:N * len(w)].view(N, len(w)))  # [N, C] logits of this chunk
            z_max = z.amax(dim=1)  # [N]
            z_sum = z.sub_(z_max[:, None]).exp_().sum(dim=1)  # [N]
            chunk_lse.append(z_max + z_sum.log())  # [N]
        lse = torch.stack(chunk_lse, dim=1).logsumexp(dim=1)  # [N] exact merge of the chunks
        ctx.save_for_backward(hidden, weight, t, valid, lse)
        ctx.chunk_size, ctx.fast = chunk_size, fast
        return torch.where(valid, target_logit - lse, 0.0)  # [N]

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, t, valid, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        (N, H), V, C, dtype = hidden.shape, weight.shape[0], ctx.chunk_size, lse.dtype
        h = hidden if ctx.fast else hidden.to(dtype)  # [N, H] matmul operand
        g = torch.where(valid, grad_out.to(dtype), 0.0)  # [N] no gradient from ignored rows
        # d out_i / d z_ij = -g_i * (p_ij - onehot_ij): the chunk block holds p - onehot, -g_i scales h_g and grad_h
        h_g = (h * -g[:, None]).to(h.dtype)  # [N, H]
        grad_h = h.new_zeros(N, H, dtype=dtype) if want_h else None  # [N, H] sum of (p - onehot) @ W
        grad_w = torch.empty_like(weight) if want_w else None  # [V, H] each chunk written once
        buf = h.new_empty(N * min(C, V), dtype=dtype)
        w_buf = h.new_empty(min(C, V), H, dtype=dtype) if want_w and weight.dtype != dtype else None
        for start in range(0, V, C):
            w = weight[start:start + C].to(h.dtype)  # [C, H]
            c = len(w)
            z = _mm(h, w.T, out=buf[:N * c].view(N, c))  # [N, C] the forward's logits again
            z.sub_(lse[:, None]).exp_()  # [N, C] p
            inside = (t >= start) & (t < start + c)  # [N] target falls in this chunk
            col = (t - start).clamp_(0, c - 1)[:, None]  # [N, 1]
            z.scatter_add_(1, col, -inside.to(dtype)[:, None])  # [N, C] p - onehot
            z = z.to(h.dtype)  # on tensor cores the operand is rounded to bf16; sums stay fp32
            if want_h:
                _mm(z, w, out=grad_h, accumulate=True)  # [N, H]
            if want_w:  # fp32 rows go straight into grad_w; others via an fp32 buffer
                rows = grad_w[start:start + c]  # [C, H]
                _mm(z.T, h_g, out=rows if w_buf is None else w_buf[:c])
                if w_buf is not None:
                    rows.copy_(w_buf[:c])
        grad_h = grad_h.mul_(-g[:, None]).to(hidden.dtype) if want_h else None
        return grad_h, grad_w, None, None


def token_logprobs(hidden, weight, targets, chunk_size=None):
    """log p(targets[i] | hidden[i]) under the head `weight`: [N, H], [V, H], [N] -> [N] float32.

    Computed in fp32 (fp64 stays fp64, for gradcheck); gradients come back in the inputs' dtypes. For half-precision
    CUDA inputs the backward's matmul operands (p - onehot, -g * h) are rounded to the input dtype, an error the size
    of the returned gradients' own rounding. Targets of -100 give 0, no gradient. chunk_size: vocab rows per chunk."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: expected hidden [N, H] and weight [V, H], "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.is_floating_point():
        raise ValueError(f"token_logprobs: targets must be integer ids of shape [{hidden.shape[0]}], "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    V = weight.shape[0]
    if ((targets >= V) | ((targets < 0) & (targets != IGNORE_INDEX))).any():
        raise ValueError(f"token_logprobs: targets must be in [0, {V}) or {IGNORE_INDEX}")
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], V)
    if chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be positive, got {chunk_size}")
    return _TokenLogprobs.apply(hidden, weight, targets, chunk_size)


def packed_logprobs(model, batch: dict, flex=None):
    """(logp_sum [S] float32, n_tokens [S] int64): summed log-prob and token count of each of the S responses of a
    packed row (batch: batches.collate_groups), in order. A token's log-prob is read from its parent's hidden state
    (the token before it in its own sequence). flex: see model.packed_attention_mask."""
    mask = packed_attention_mask(batch["document"], batch["branch"], flex)
    hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], mask)  # [1, N, H]
    scored = batch["parent"] >= 0  # [1, N] the targets
    predictors = hidden[0, batch["parent"][scored]]  # [n, H]
    logp = token_logprobs(predictors, model.lm_head_weight, batch["input_ids"][scored])  # [n]
    seg = batch["segment"][scored]
    S = int(batch["segment"].max()) + 1
    return logp.new_zeros(S).index_add(0, seg, logp), torch.bincount(seg, minlength=S)
