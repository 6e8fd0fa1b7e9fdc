"""Packed rows: the flex_attention block mask against the dense per-group masks, and the token-budget packer."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask

from sso_mini.batches import collate_groups, micro_batches, record_groups, row_length
from sso_mini.checkpoint import load_model
from sso_mini.logprobs import packed_logprobs
from sso_mini.model import may_attend, packed_attention_mask

# Three records of different lengths: capped and finished responses, and one whose long y+ makes the
# cutoff trim its prompts (its groups then split, see record_groups).
RECORDS = [
    {"prompt": "Name a fruit.", "system": "", "p_system": "Answer helpfully and accurately.",
     "n_system": "Answer rudely.", "chosen": "An apple is a tasty fruit that grows on trees in orchards all "
     "around the world, in many colours.", "rejected": "No.", "raw": "Apple.",
     "capped": {"chosen": True, "rejected": False, "raw": False}},
    {"prompt": "Say hello to a new colleague in one line.", "system": "", "p_system": "Be warm.",
     "n_system": "Be cold.", "chosen": "Hello and welcome!", "rejected": "What do you want", "raw": "Hi there",
     "capped": {"chosen": False, "rejected": True, "raw": True}},
    {"prompt": "Count to three.", "system": "", "p_system": "Be exact.", "n_system": "Be sloppy.",
     "chosen": "One, two, three.", "rejected": "One, three, seven.", "raw": "1, 2, 3."},
]
CUTOFF = 40


def packed_row(tok):
    groups = [g for r in RECORDS for g in record_groups(tok, r, CUTOFF)]
    return groups, collate_groups(groups)


def test_the_rows_span_capped_finished_and_trimmed_records(smollm2):
    tok = smollm2[1]
    assert len(record_groups(tok, RECORDS[0], CUTOFF)) > 3  # the cutoff trimmed this record's prompts
    assert len(record_groups(tok, RECORDS[2], CUTOFF)) == 3


def test_dense_masks_follow_the_rule_group_by_group(smollm2):
    groups, batch = packed_row(smollm2[1])
    masks = packed_attention_mask(batch["document"], batch["branch"], flex=False)
    assert len(masks) == len(groups)
    start = 0
    for (prompt, responses), m in zip(groups, masks):
        P, T = len(prompt), len(prompt) + sum(map(len, responses))
        assert m.shape == (1, 1, T, T)
        expected = torch.zeros(T, T, dtype=torch.bool)  # written out: causal prompt, each response sees it
        expected[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        s = P
        for y in responses:
            expected[s:s + len(y), :P] = True
            expected[s:s + len(y), s:s + len(y)] = torch.ones(len(y), len(y), dtype=torch.bool).tril()
            s += len(y)
        assert torch.equal(m[0, 0], expected)
        start += T
    assert start == batch["input_ids"].shape[1]


def test_block_mask_path_equals_dense_path_on_packed_records(tiny_model_dir):
    """flex_attention runs forward-only on the CPU (it has no CPU backward): its log-probs are checked
    directly; the gradients are checked through the block mask's own pattern materialised as one
    [N, N] mask, which is what flex_attention computes with."""
    model, tok = load_model(tiny_model_dir)
    groups, batch = packed_row(tok)
    block = packed_attention_mask(batch["document"], batch["branch"], flex=True)
    assert isinstance(block, BlockMask)
    with torch.no_grad():
        dense_logp, dense_n = packed_logprobs(model, batch, flex=False)
        flex_logp, flex_n = packed_logprobs(model, batch, flex=True)
    assert dense_n.tolist() == flex_n.tolist() == [len(y) for _, ys in groups for y in ys]
    torch.testing.assert_close(flex_logp, dense_logp, rtol=1e-5, atol=1e-5)

    model.train()
    whole = create_mask(block.mask_mod, None, None, *block.seq_lengths, device="cpu")  # [1, 1, N, N]
    weights = torch.randn(len(dense_n), generator=torch.Generator().manual_seed(0))
    grads = []
    for mask in (packed_attention_mask(batch["document"], batch["branch"], flex=False), whole):
        model.zero_grad()
        hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], mask)
        scored = batch["parent"] >= 0
        logp = F.log_softmax(hidden[0, batch["parent"][scored]] @ model.lm_head_weight.T, -1)
        logp = logp.gather(1, batch["input_ids"][scored][:, None])[:, 0]  # [n]
        per_response = torch.zeros(len(dense_n)).index_add(0, batch["segment"][scored], logp)
        (per_response * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(per_response.detach(), dense_logp, rtol=1e-5, atol=1e-5)
    for dense_grad, block_grad in zip(*grads):  # fp32 sums in another order: relative to the largest entry
        assert (block_grad - dense_grad).abs().max() <= 1e-5 * dense_grad.abs().max()


def test_may_attend_hides_siblings_and_other_groups():
    # group 0: prompt (2 tokens), y1 (2), y2 (1); group 1: prompt (1), y1 (1)
    document = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    branch = torch.tensor([0, 0, 1, 1, 2, 0, 1])
    q, kv = torch.arange(7)[:, None], torch.arange(7)[None, :]
    allowed = may_attend(document, branch, q, kv)
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]  # y1's 2nd token
    assert allowed[4].tolist() == [True, True, False, False, True, False, False]  # y2 skips y1
    assert allowed[6].tolist() == [False] * 5 + [True, True]  # group 1 never sees group 0


@pytest.mark.parametrize("budget", [1, 50, 120, 400, 10_000])
def test_packer_never_splits_a_record_and_keeps_the_budget(budget):
    tokens = dict(enumerate([30, 90, 45, 200, 10, 10, 10, 64]))
    packs = micro_batches(list(tokens), tokens, max_records=1, max_tokens=budget)
    assert [i for p in packs for i in p] == list(tokens)  # every record once, in order, none split
    for p in packs:
        assert len(p) == 1 or sum(tokens[i] for i in p) <= budget  # over budget only alone
    for a, b in zip(packs, packs[1:]):  # greedy: the next record did not fit
        assert sum(tokens[i] for i in a) + tokens[b[0]] > budget


def test_packer_without_a_budget_counts_records():
    tokens = dict(enumerate([5] * 7))
    assert micro_batches(list(tokens), tokens, max_records=3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_row_length_is_the_packed_row(smollm2):
    groups = record_groups(smollm2[1], RECORDS[1], 2048)
    assert row_length(groups) == collate_groups(groups)["input_ids"].shape[1]
