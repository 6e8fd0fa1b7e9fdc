"""The tests' reference for scoring: each sequence in its own right-padded row. sso-mini scores packed
rows (logprobs.packed_logprobs); this is what those must equal."""

import torch

from sso_mini.logprobs import token_logprobs
from sso_mini.model import padding_causal_mask, position_ids_from_mask


def sequence_logprobs(model, input_ids, attention_mask, response_mask):
    """Summed log-prob of each row's response tokens, and how many there are.

    input_ids, attention_mask, response_mask: [B, T]; response_mask marks the tokens to score.
    Token t is predicted by the hidden state at t - 1, so only those rows go through the lm_head.
    Positions count attended tokens only, so left-padded rows see the same positions as unpadded.
    Returns (logp_sum [B] float32, n_tokens [B] int64).
    """
    if not (input_ids.shape == attention_mask.shape == response_mask.shape) or input_ids.dim() != 2:
        raise ValueError(f"sequence_logprobs: input_ids, attention_mask and response_mask must share "
                         f"one [B, T] shape, got {tuple(input_ids.shape)}, "
                         f"{tuple(attention_mask.shape)}, {tuple(response_mask.shape)}")
    response_mask = response_mask.bool()
    if response_mask[:, 0].any():
        raise ValueError("sequence_logprobs: response_mask marks position 0, which has no context")
    if (response_mask & (attention_mask == 0)).any():
        raise ValueError("sequence_logprobs: response_mask marks padding (attention_mask is 0 there)")
    position_ids = position_ids_from_mask(attention_mask)  # [B, T]
    hidden = model.hidden_states(input_ids, position_ids, padding_causal_mask(attention_mask))  # [B, T, H]
    scored = response_mask[:, 1:]  # [B, T-1] target positions, shifted onto their predictors
    logp = token_logprobs(hidden[:, :-1][scored], model.lm_head_weight,
                          input_ids[:, 1:][scored])  # [n]
    row = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(scored)
    logp_sum = logp.new_zeros(input_ids.shape[0]).index_add(0, row[scored], logp)  # [B]
    return logp_sum, scored.sum(dim=1)
