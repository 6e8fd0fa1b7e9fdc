"""A recipe scores only the sequences its loss reads: the tokens the model runs, counted, and the same losses and
metrics as when all six sequences are scored."""

from dataclasses import replace

import pytest
import torch

from sso_mini.batches import response_ids
from sso_mini.checkpoint import load_model
from sso_mini.losses import sso_loss
from sso_mini.tokenizer import end_of_turn_id, prompt_ids
from sso_mini.trainer import TrainConfig, score_records, train_epoch

RECORDS = [
    {"prompt": "Name a fruit.", "system": "", "p_system": "Answer helpfully.", "n_system": "Answer rudely, at length.",
     "chosen": "An apple is a tasty fruit.", "rejected": "No.", "raw": "Apple.",
     "capped": {"chosen": False, "rejected": True, "raw": False}},
    {"prompt": "Say hello.", "system": "", "p_system": "Be warm.", "n_system": "Be cold.",
     "chosen": "Hello! It is lovely to meet you.", "rejected": "What do you want?", "raw": "Hello."},
]
# the three pairs as (system-prompt field, chosen response, rejected response), in SEQUENCES order
PAIRS = {"x": (None, "chosen", "rejected"), "x+": ("p_system", "chosen", "rejected"),
         "x-": ("n_system", "raw", "chosen")}
COLUMNS = {"x": (0, 1), "x+": (2, 3), "x-": (4, 5)}  # the pairs' columns of a [R, 6] tensor
# each recipe's TrainConfig and the pairs its loss reads, written out here
RECIPES = {
    "SSO (v1)": (dict(), ("x", "x+", "x-")),
    "W on G only": (dict(form="w_on_g"), ("x", "x+", "x-")),
    "w/o W": (dict(use_w=False), ("x", "x+", "x-")),
    "w/o G": (dict(use_g=False), ("x",)),
    "PBAA, v2's policy stage": (dict(use_w=False, use_g=False), ("x",)),
    "v2's generator": (dict(form="generator"), ("x+", "x-")),
    "v2's generator, L+ only": (dict(form="generator", terms=("pos",)), ("x+",)),
    "v2's generator, L- only": (dict(form="generator", terms=("neg",)), ("x-",)),
}


def tokens_of(tok, record, pairs) -> int:
    """The tokens a packed row of these pairs holds: each pair's prompt once, then its two responses."""
    eot = end_of_turn_id(tok)
    total = 0
    for name in pairs:
        system, chosen, rejected = PAIRS[name]
        total += len(prompt_ids(tok, record[system] if system else "", record["prompt"]))
        total += len(response_ids(tok, record, chosen, eot)) + len(response_ids(tok, record, rejected, eot))
    return total


def counting(model):
    """Wrap the model's forward so that every token it runs is counted in the returned list's first item."""
    seen, forward = [0], model.hidden_states

    def hidden_states(input_ids, *args, **kwargs):
        seen[0] += input_ids.numel()
        return forward(input_ids, *args, **kwargs)

    model.hidden_states = hidden_states
    return seen


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_recipe_forwards_only_the_pairs_its_loss_reads(tiny_model_dir, tmp_path, recipe):
    settings, pairs = RECIPES[recipe]
    model, tok = load_model(tiny_model_dir)
    cfg = TrainConfig(**settings, batch_size=2, micro_batch_size=1, lr=1e-3, save_every=1000, autocast=False)
    seen = counting(model)
    ref = score_records(model, tok, RECORDS, cfg, progress=False)
    assert seen[0] == sum(tokens_of(tok, r, pairs) for r in RECORDS)
    read = [c for name in pairs for c in COLUMNS[name]]
    assert not ref[:, read].isnan().any() and ref[:, [c for c in range(6) if c not in read]].isnan().all()
    seen[0] = 0
    train_epoch(model, tok, RECORDS, ref, cfg, tmp_path, progress=False)
    assert seen[0] == sum(tokens_of(tok, r, pairs) for r in RECORDS)  # one step, a record per forward


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_scoring_fewer_sequences_keeps_every_loss_and_metric(tiny_model_dir, tmp_path, recipe):
    """The first step's loss and metrics (a policy apart from its reference, lr 0) against sso_loss on all six
    sequences, scored by the full v1 configuration."""
    settings, _ = RECIPES[recipe]
    reference, tok = load_model(tiny_model_dir)
    policy, _ = load_model(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = TrainConfig(**settings, loss_type="dpo", batch_size=2, micro_batch_size=1, lr=0.0, save_every=1000,
                      autocast=False)
    every = replace(cfg, form="v1", use_g=True)  # reads all six
    ref_all, policy_all = (score_records(m, tok, RECORDS, every, progress=False) for m in (reference, policy))
    eot = end_of_turn_id(tok)
    lengths = torch.tensor([[len(response_ids(tok, r, k, eot)) for k in ("chosen", "rejected", "chosen", "rejected",
                                                                         "raw", "chosen")] for r in RECORDS])
    want_loss, want = sso_loss(policy_all, ref_all, lengths, **cfg.loss_settings())
    ref = score_records(reference, tok, RECORDS, cfg, progress=False)
    (row,) = train_epoch(policy, tok, RECORDS, ref, cfg, tmp_path, progress=False)
    assert row["loss"] == pytest.approx(want_loss.item(), rel=1e-5)
    logged = {k: v for k, v in row.items() if k in want}
    assert logged == pytest.approx({k: want[k] for k in logged}, rel=1e-4, abs=1e-6)
    pairs_logged = {k.split("rewards/")[0] for k in logged if "rewards/accuracies" in k}
    assert pairs_logged == {{"x": "", "x+": "p_", "x-": "n_"}[p] for p in RECIPES[recipe][1]}
