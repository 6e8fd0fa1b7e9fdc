"""The CUDA-only paths no CPU test can run, checked on a GPU against what the CPU tests trust.

    python benchmarks/gpu_checks.py            (on a CUDA machine; benchmarks/gpu_kit.py runs them first)

1. logprobs.py's bf16 x bf16 -> fp32 matmuls (out_dtype, tensor cores) against the same kernel on fp32 copies;
2. the resume state of fused AdamW (CUDA only): a state saved after 2 steps and loaded into a fresh optimizer
   continues to the same weights as an uninterrupted run;
3. flex_attention's backward on a packed row (a BlockMask) against the dense masks the CPU path uses.
The compiled sampler's graphs are counted by the kit's sampling stage. Each check prints one line; the script exits
non-zero if any fails.
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sso_mini.batches import collate_groups  # noqa: E402
from sso_mini.config import ModelConfig  # noqa: E402
from sso_mini.logprobs import packed_logprobs, token_logprobs  # noqa: E402
from sso_mini.model import Transformer  # noqa: E402
from sso_mini.trainer import TrainConfig, load_resume_state, make_optimizer, save_resume_state  # noqa: E402

failed, results = [], {}  # results: {check: {"ok", "detail"}}, which benchmarks/gpu_kit.py records


def report(name, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    results[name] = {"ok": bool(ok), "detail": detail}
    if not ok:
        failed.append(name)


def bf16_logprobs():
    torch.manual_seed(0)
    h = torch.randn(2048, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.02 * torch.randn(151936, 3584, device="cuda")).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 151936, (2048,), device="cuda")
    fast = token_logprobs(h, w, t)
    fast.sum().backward()
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    exact = token_logprobs(h32, w32, t)  # the same bf16 numbers, upcast first
    exact.sum().backward()
    diff = (fast - exact).abs().max().item()
    grad = ((h.grad.float() - h32.grad).abs().max() / h32.grad.abs().max()).item()
    report("bf16 log-probs on tensor cores", diff < 1e-3 and grad < 1e-2, f"max |diff| {diff:.2e}, grad rel {grad:.2e}")


def fused_adamw_resume():
    config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)

    def steps(model, optimizer, params, n):
        for _ in range(n):
            loss = model(torch.arange(16, device="cuda")[None]).float().logsumexp(-1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    whole = Transformer(config).cuda()
    cut = Transformer(config).cuda()
    cut.load_state_dict(whole.state_dict())
    cfg = TrainConfig()
    opt, params = make_optimizer(whole, cfg)
    steps(whole, opt, params, 4)
    opt2, params2 = make_optimizer(cut, cfg)
    steps(cut, opt2, params2, 2)
    path = Path(tempfile.mkdtemp()) / "resume"
    save_resume_state(path, cut, opt2, 2, params2)
    fresh = Transformer(config).cuda()
    opt3, params3 = make_optimizer(fresh, cfg)
    step = load_resume_state(path, fresh, opt3, params3)
    steps(fresh, opt3, params3, 2)
    same = all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), fresh.state_dict().values()))
    report("fused AdamW resume state", same and step == 2 and opt3.defaults["fused"], f"step {step}, equal {same}")


def flex_backward():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    model = Transformer(config).cuda()
    groups = [(list(range(5, 60)), [list(range(100, 140)), list(range(200, 230))]),
              (list(range(7, 90)), [list(range(300, 320)), list(range(400, 455))])]
    batch = collate_groups(groups, "cuda")
    grads = {}
    for flex in (True, False):
        model.zero_grad()
        logp, _ = packed_logprobs(model, batch, flex=flex)
        logp.sum().backward()
        grads[flex] = (logp.detach(), [p.grad.clone() for p in model.parameters()])
    value = (grads[True][0] - grads[False][0]).abs().max().item()
    grad = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
               for a, b in zip(grads[True][1], grads[False][1]))
    report("flex_attention backward on a packed row", value < 1e-3 and grad < 1e-2,
           f"log-probs max |diff| {value:.2e}, gradients rel {grad:.2e}")


CHECKS = (bf16_logprobs, fused_adamw_resume, flex_backward)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/gpu_checks.py needs a CUDA device")
    for check in CHECKS:
        try:
            check()
        except Exception as e:  # a check that cannot run is a failed check; the others still run
            report(check.__name__, False, f"{type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
