"""The CPU fast path of sampling (generate.py, unless it compiles): the same projections through oneDNN.

Why: at a few rows per step a matmul only streams its weights, and torch's default CPU kernels (MKL) stream
small matrices well below the memory's rate; oneDNN, which torch also ships, and fewer, larger matrices read
faster (benchmarks/bench_linear.py measures both). Every output is the same dot product.
"""

import contextlib

import torch


ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn(x, weight, bias=None):
    """x @ weight.T (+ bias) through oneDNN (the op torch.compile's CPU backend emits for linear layers)."""
    y = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return y if bias is None else y + bias


def fused(*projections):
    """One oneDNN matmul over the projections' concatenated weights, its output split back per projection."""
    weight = torch.cat([p.weight for p in projections])
    bias = None if projections[0].bias is None else torch.cat([p.bias for p in projections])
    sizes = [p.out_features for p in projections]
    if len(projections) == 1:
        return lambda x: onednn(x, weight, bias)
    return lambda x: onednn(x, weight, bias).split(sizes, -1)


@contextlib.contextmanager
def fast_cpu(model):
    """While sampling in fp32 on a CPU: q, k, v and gate, up each one oneDNN matmul over concatenated weights
    (copies of about 70% of the weights, dropped at the end), o, down and the lm_head through oneDNN too.
    Nothing happens on a GPU, in bf16, inside a block already fast, or where a projection carries a LoRA
    adapter."""
    a, m, w = model.layers[0].self_attn, model.layers[0].mlp, model.embed_tokens.weight
    plain = all(type(p).__name__ == "Projection" for p in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj))
    if not (ONEDNN and plain and w.device.type == "cpu" and w.dtype == torch.float32) or "qkv" in vars(a):
        yield
        return
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        a.qkv = fused(a.q_proj, a.k_proj, a.v_proj)  # instance attributes: they stand in for the methods
        m.gate_up = fused(m.gate_proj, m.up_proj)
        a.o_proj.forward, m.down_proj.forward = fused(a.o_proj), fused(m.down_proj)
    model.logits = lambda h: onednn(h, model.lm_head_weight)
    try:
        yield
    finally:
        for layer in model.layers:
            for module, name in ((layer.self_attn, "qkv"), (layer.mlp, "gate_up"), (layer.self_attn.o_proj,
                                 "forward"), (layer.mlp.down_proj, "forward")):
                delattr(module, name)
        del model.logits
