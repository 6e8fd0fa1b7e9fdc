"""--logprob-filter: keep only the pairs whose log-probs move the right way with the principles (the
released code's preference_filter.py). An option, off by default: train.py imports it when switched on.
"""

from collections import Counter

import torch

from .batches import collate_groups, response_ids, truncate
from .logprobs import packed_logprobs
from .tokenizer import end_of_turn_id, prompt_ids


@torch.no_grad()
def logprob_filter(model, tokenizer, records, cutoff=2048) -> tuple[list[dict], Counter]:
    """Keep records whose y_pos / y_neg log-probs move the right way with the principles.

    Mean token log-probs of y_pos and y_neg under x (o), x+ (p) and x- (n):
      1. ordered: p_pos > o_pos > n_pos and n_neg > o_neg > p_neg;
      2. near on-policy: o_pos and o_neg at or above their means over the surviving records;
      3. a large gap: (p_pos - n_pos) and (n_neg - p_neg) above their means.
    """
    eot = end_of_turn_id(tokenizer)
    means = []
    for r in records:  # one packed row per record: y+, then y-, each under x, x+ and x-
        prompts = [prompt_ids(tokenizer, system, r["prompt"]) for system in ("", r["p_system"], r["n_system"])]
        groups = [(p, [y]) for key in ("chosen", "rejected") for p, y in
                  (truncate(p, response_ids(tokenizer, r, key, eot), cutoff) for p in prompts)]
        logp, n = packed_logprobs(model, collate_groups(groups, model.lm_head_weight.device))
        means.append((logp / n).view(2, 3))
    scores = torch.stack(means).cpu()  # [R, (pos, neg), (o, p, n)]
    o_pos, p_pos, n_pos = scores[:, 0].unbind(-1)
    o_neg, p_neg, n_neg = scores[:, 1].unbind(-1)
    keep = (p_pos > o_pos) & (o_pos > n_pos) & (n_neg > o_neg) & (o_neg > p_neg)
    stats = Counter(filter_in=len(records), filter_order=int(keep.sum()))
    for step, cond in (("filter_onpolicy", lambda k: (o_pos >= o_pos[k].mean()) & (o_neg >= o_neg[k].mean())),
                       ("filter_gap", lambda k: ((p_pos - n_pos) > (p_pos - n_pos)[k].mean())
                        & ((n_neg - p_neg) > (n_neg - p_neg)[k].mean()))):
        if keep.any():
            keep = keep & cond(keep)
        stats[step] = int(keep.sum())
    return [r for r, k in zip(records, keep.tolist()) if k], stats
