"""token_logprobs and sequence_logprobs against log_softmax(h @ W.T).gather written out in full."""

import pytest
import torch

from sso_mini.batches import collate_groups, record_groups, record_sequences
from sso_mini.config import ModelConfig
from reference import sequence_logprobs
from sso_mini.logprobs import packed_logprobs, token_logprobs
from sso_mini.model import Transformer


def naive(h, W, t):
    """The textbook formula over the full [N, V] logits; -100 rows give 0."""
    logp = torch.log_softmax(h @ W.T, dim=-1)  # [N, V]
    return logp.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t != -100)  # [N]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def inputs(N=37, V=1000, H=32, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    h = torch.randn(N, H).mul_(0.5).to(dtype).requires_grad_()
    W = torch.randn(V, H).mul_(0.3).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,))
    g = torch.randn(N)  # a generic upstream gradient, not just ones
    return h, W, t, g


def reference(h, W, t, g):
    """Value and grads of the naive formula in float64 on the same input values."""
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    out = naive(h64, W64, t)
    gh, gW = torch.autograd.grad(out, (h64, W64), g.double())
    return out, gh, gW


# V = 1000 is not a multiple of 64, 300 or 999; 1 and 5000 are the extremes; None is the default.
@pytest.mark.parametrize("chunk_size", [None, 1, 64, 300, 999, 1000, 5000])
def test_values_and_grads_match_naive_fp32(chunk_size):
    h, W, t, g = inputs()  # N = 37 tokens
    out = token_logprobs(h, W, t, chunk_size=chunk_size)
    gh, gW = torch.autograd.grad(out, (h, W), g)
    ref, ref_gh, ref_gW = reference(h, W, t, g)
    assert out.dtype == torch.float32 and out.shape == (37,)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(gh, ref_gh) < 1e-5
    assert rel_err(gW, ref_gW) < 1e-5


def test_large_logits_stay_finite():
    # logits in the hundreds overflow exp() without the per-chunk max shift
    h, W, t, g = inputs(N=9, V=500, H=16)
    h, W = (h.detach() * 40).requires_grad_(), (W.detach() * 10).requires_grad_()
    out = token_logprobs(h, W, t, chunk_size=128)
    gh, gW = torch.autograd.grad(out, (h, W), g)
    ref, ref_gh, ref_gW = reference(h, W, t, g)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5 and rel_err(gh, ref_gh) < 1e-5 and rel_err(gW, ref_gW) < 1e-5


def test_gradcheck_float64():
    torch.manual_seed(0)
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3, 22, -100, 0, 7, 3])
    assert torch.autograd.gradcheck(lambda h, W: token_logprobs(h, W, t, chunk_size=7), (h, W))


def test_ignored_targets_give_zero_and_no_gradient():
    h, W, t, g = inputs()
    ignored = torch.tensor([0, 5, 36])
    t[ignored] = -100
    out = token_logprobs(h, W, t, chunk_size=128)
    gh, gW = torch.autograd.grad(out, (h, W), g)
    assert (out[ignored] == 0).all()
    assert (gh[ignored] == 0).all()
    # the kept rows alone give the same weight gradient: ignored rows added nothing to it
    keep = t != -100
    _, _, ref_gW = reference(h[keep], W, t[keep], g[keep])
    assert rel_err(gW, ref_gW) < 1e-5
    ref, ref_gh, _ = reference(h, W, t, g)
    assert rel_err(out, ref) < 1e-5 and rel_err(gh, ref_gh) < 1e-5


def test_bf16_inputs_are_computed_in_fp32():
    # Stated tolerance: values match fp32 math on the same (bf16-rounded) inputs to 1e-5 relative,
    # because nothing is computed in bf16; grads are returned in bf16, so they carry bf16 rounding
    # (2^-8 relative), checked at 1e-2 relative to the largest entry.
    h, W, t, g = inputs(dtype=torch.bfloat16)
    out = token_logprobs(h, W, t, chunk_size=128)
    gh, gW = torch.autograd.grad(out, (h, W), g)
    assert out.dtype == torch.float32 and gh.dtype == gW.dtype == torch.bfloat16
    ref, ref_gh, ref_gW = reference(h, W, t, g)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(gh, ref_gh) < 1e-2
    assert rel_err(gW, ref_gW) < 1e-2


def test_grad_for_one_input_only():
    h, W, t, g = inputs()
    ref, ref_gh, ref_gW = reference(h, W, t, g)
    (gh,) = torch.autograd.grad(token_logprobs(h, W.detach(), t, chunk_size=300), (h,), g)
    (gW,) = torch.autograd.grad(token_logprobs(h.detach(), W, t, chunk_size=300), (W,), g)
    assert rel_err(gh, ref_gh) < 1e-5 and rel_err(gW, ref_gW) < 1e-5


def test_bad_inputs_raise():
    h, W, t, _ = inputs()
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(h, W, torch.full_like(t, 1000))  # V = 1000 is out of range
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(h, W, t[:-1])
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(h, W[:, :-1], t)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(h, W, t, chunk_size=0)


# --- sequence_logprobs -------------------------------------------------------------------------


def full_logits_score(model, input_ids, attention_mask, response_mask):
    """Score through the model's full [B, T, V] logits: shift, log_softmax, gather, mask, sum."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids, position_ids=position_ids, attention_mask=attention_mask)  # [B, T, V]
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # [B, T-1, V]
    logp = logp.gather(2, input_ids[:, 1:, None]).squeeze(2)  # [B, T-1]
    mask = response_mask[:, 1:].double()
    return (logp * mask).sum(1), response_mask[:, 1:].sum(1)


def left_pad(rows, pad_id):
    """[(prompt ids, response ids)] -> left-padded input_ids, attention_mask, response_mask [B, T]."""
    T = max(len(p) + len(r) for p, r in rows)
    ids, att, resp = [], [], []
    for p, r in rows:
        n_pad = T - len(p) - len(r)
        ids.append([pad_id] * n_pad + p + r)
        att.append([0] * n_pad + [1] * (len(p) + len(r)))
        resp.append([0] * (n_pad + len(p)) + [1] * len(r))
    return torch.tensor(ids), torch.tensor(att), torch.tensor(resp)


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def test_sequence_scorer_matches_full_logits_and_ignores_left_padding():
    model = tiny_model()
    rows = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13, 14, 15, 16, 17], [18, 19]), ([20], [21, 22]), ([23, 24], [])]
    input_ids, attention_mask, response_mask = left_pad(rows, pad_id=0)
    logp_sum, n_tokens = sequence_logprobs(model, input_ids, attention_mask, response_mask)
    ref_sum, ref_n = full_logits_score(model, input_ids, attention_mask, response_mask)
    assert logp_sum.dtype == torch.float32 and n_tokens.tolist() == ref_n.tolist() == [4, 2, 2, 0]
    assert rel_err(logp_sum, ref_sum) < 1e-5 and logp_sum[3] == 0
    # each row scored alone, with no padding at all, gives the same number
    for i, (p, r) in enumerate(rows[:3]):
        alone = left_pad([(p, r)], pad_id=0)
        assert abs(sequence_logprobs(model, *alone)[0].item() - logp_sum[i].item()) < 1e-4


def test_sequence_scorer_gradient_reaches_the_model():
    model = tiny_model().train()
    input_ids, attention_mask, response_mask = left_pad([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], 0)
    logp_sum, _ = sequence_logprobs(model, input_ids, attention_mask, response_mask)
    grads = torch.autograd.grad(logp_sum.sum(), list(model.parameters()))
    ref_sum, _ = full_logits_score(model, input_ids, attention_mask, response_mask)
    ref_grads = torch.autograd.grad(ref_sum.sum(), list(model.parameters()))
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) < 1e-4


def test_sequence_scorer_rejects_bad_masks():
    model = tiny_model()
    input_ids, attention_mask, response_mask = left_pad([([1], [3]), ([4, 5, 6], [7])], 0)
    first = response_mask.clone()
    first[:, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprobs(model, input_ids, attention_mask, first)
    on_pad = response_mask.clone()
    on_pad[0, 1] = 1  # row 0 is padded at positions 0 and 1
    with pytest.raises(ValueError, match="padding"):
        sequence_logprobs(model, input_ids, attention_mask, on_pad)
    with pytest.raises(ValueError, match="shape"):
        sequence_logprobs(model, input_ids, attention_mask, response_mask[:, 1:])


def test_sequence_scorer_equals_full_logits_on_real_smollm2(smollm2):
    model, tok = smollm2
    chats = [("What is the capital of France?", "The capital of France is Paris."),
             ("Write a haiku about rain.", "Soft rain on the roof,\nwhispers to the sleeping town,\nmorning "
                                           "smells of earth."),
             ("Say hi.", "Hi!")]
    rows = []
    for user, answer in chats:
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True))
        rows.append((prompt, tok.encode(answer)))
    input_ids, attention_mask, response_mask = left_pad(rows, pad_id=tok.pad_id)
    with torch.no_grad():
        logp_sum, n_tokens = sequence_logprobs(model, input_ids, attention_mask, response_mask)
        ref_sum, ref_n = full_logits_score(model, input_ids, attention_mask, response_mask)
    assert n_tokens.tolist() == ref_n.tolist() == [len(r) for _, r in rows]
    assert rel_err(logp_sum, ref_sum) < 1e-4
    assert (logp_sum < 0).all()


def alone(model, prompt, response):
    """One sequence, no padding, no packing, through the full logits."""
    ids = torch.tensor([prompt + response])
    resp = torch.tensor([[0] * len(prompt) + [1] * len(response)])
    return full_logits_score(model, ids, torch.ones_like(ids), resp)[0][0]


def test_prompt_sharing_rows_score_each_response_as_if_alone():
    model = tiny_model().train()
    groups = [([5, 6, 7], [[8, 9, 10, 11], [12, 13]]), ([20], [[21], [22, 23, 24]]), ([30, 31, 32, 33, 34], [[35]])]
    batch = collate_groups(groups)
    logp, n = packed_logprobs(model, batch)
    flat = [(p, y) for p, ys in groups for y in ys]
    ref = torch.stack([alone(model, p, y) for p, y in flat])
    assert n.tolist() == [len(y) for _, y in flat]
    assert rel_err(logp, ref) < 1e-5
    # the gradient too: the masks must keep each response from seeing its sibling
    weights = torch.randn(len(flat))
    grads = torch.autograd.grad((logp * weights).sum(), list(model.parameters()))
    ref_grads = torch.autograd.grad((ref.float() * weights).sum(), list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4


def test_record_groups_on_real_smollm2_equal_the_six_sequences(smollm2):
    model, tok = smollm2
    record = {"prompt": "Name a fruit.", "system": "", "p_system": "Answer helpfully and accurately.",
              "n_system": "Answer rudely.", "chosen": "An apple is a tasty fruit that grows on trees in orchards "
              "all around the world.", "rejected": "No.", "raw": "Apple."}
    for cutoff in (2048, 40):  # 40: a long y+ cuts its prompt, a short y- does not
        seqs = record_sequences(tok, record, cutoff)
        groups = record_groups(tok, record, cutoff)
        assert [y for _, ys in groups for y in ys] == [y for _, y in seqs]
        with torch.no_grad():
            logp, _ = packed_logprobs(model, collate_groups(groups))
            ref = torch.stack([alone(model, p, y) for p, y in seqs])
        assert rel_err(logp, ref) < 1e-4
    assert len(record_groups(tok, record, 2048)) == 3 and len(record_groups(tok, record, 40)) > 3
