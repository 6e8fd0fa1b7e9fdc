"""Records -> the six training sequences -> packed prompt-sharing rows.

One SSO record gives six (prompt, response) sequences, the loss's three pairs, as the columns of every [B, 6] tensor:

    col  name        pair                  sequence
    0    chosen      base  (x:  y+ > y-)   y_pos | x
    1    rejected    base                  y_neg | x
    2    p_chosen    G+    (x+: y+ > y-)   y_pos | x+
    3    p_rejected  G+                    y_neg | x+
    4    n_chosen    G-    (x-: y^o > y+)  y_raw | x-
    5    n_rejected  G-                    y_pos | x-

Each pair shares its prompt, so a record runs as three prompt-sharing groups packed into one row (collate_groups),
and several records can share a row up to a token budget (micro_batches); `pack` lays out a whole epoch once. A
response the sampler cut at its token cap is scored as the prefix it is, without the end-of-turn token.
"""

import torch

from .tokenizer import end_of_turn_id, prompt_ids

# (column name, the prompt's system-message field or None for the plain x, the response field)
SEQUENCES = (
    ("chosen", None, "chosen"), ("rejected", None, "rejected"),
    ("p_chosen", "p_system", "chosen"), ("p_rejected", "p_system", "rejected"),
    ("n_chosen", "n_system", "raw"), ("n_rejected", "n_system", "chosen"),
)


def truncate(prompt: list[int], response: list[int], cutoff: int) -> tuple[list[int], list[int]]:
    """Fit prompt + response in `cutoff` tokens, the response keeping at least half; the prompt loses tokens from its
    start, so the user turn and the assistant header right before the response survive."""
    if len(prompt) + len(response) <= cutoff:
        return prompt, response
    response = response[:max(cutoff - len(prompt), cutoff // 2)]
    return prompt[len(prompt) - (cutoff - len(response)):], response


def is_capped(record, key) -> bool:
    """Did response `key` ("chosen", "rejected", "raw") hit the sampling cap? Absent: no."""
    return bool((record.get("capped") or {}).get(key, False))


def response_tokens(tokenizer, text: str, capped: bool, eot: int) -> list[int]:
    """The tokens a response is scored on: its text, then the end-of-turn token unless it was capped (a prefix)."""
    return tokenizer.encode(text) + ([] if capped else [eot])


def response_ids(tokenizer, record, key, eot) -> list[int]:
    """response_tokens of a record's response `key`."""
    return response_tokens(tokenizer, record[key], is_capped(record, key), eot)


def record_sequences(tokenizer, record, cutoff=2048, eot=None) -> list[tuple[list[int], list[int]]]:
    """The six (prompt ids, response ids) of one record, in SEQUENCES order."""
    eot = end_of_turn_id(tokenizer) if eot is None else eot
    prompts = {field: prompt_ids(tokenizer, record[field] if field else "", record["prompt"])
               for field in (None, "p_system", "n_system")}
    return [truncate(prompts[system], response_ids(tokenizer, record, response, eot), cutoff)
            for _, system, response in SEQUENCES]


def record_groups(tokenizer, record, cutoff=2048, eot=None, columns=range(6)) -> list[tuple[list, list[list]]]:
    """The sequences in `columns` (SEQUENCES indices; all six by default) as prompt-sharing groups: (x: y+, y-),
    (x+: y+, y-), (x-: y^o, y+), responses in column order. Two sequences whose prompts `cutoff` trimmed differently,
    or a pair of which one column is read, make one group per sequence."""
    seqs = record_sequences(tokenizer, record, cutoff, eot)
    groups = []
    for pair in ((0, 1), (2, 3), (4, 5)):
        kept = [seqs[c] for c in pair if c in columns]
        if len(kept) == 2 and kept[0][0] == kept[1][0]:
            groups.append((kept[0][0], [kept[0][1], kept[1][1]]))
        else:
            groups += [(prompt, [y]) for prompt, y in kept]
    return groups


def row_length(groups) -> int:
    """Tokens the groups take in a packed row: each prompt once, then its responses."""
    return sum(len(prompt) + sum(map(len, responses)) for prompt, responses in groups)


def collate_groups(groups, device=None) -> dict:
    """All groups packed into ONE row, no padding: each group's prompt once, then its responses. A response token
    attends to its group's prompt and the earlier tokens of its own response only (model.may_attend), and its positions
    continue the prompt's, so every response is scored exactly as if it followed the prompt alone, while the prompt
    (four of the six carry a long principle) runs once instead of twice.

    The row = [prompt 0 | y 0 | y 1 | prompt 1 | y 2 | y 3 | ...], every tensor [1, N]: input_ids, position_ids,
      document: the token's group; branch: 0 in a prompt, k in its k-th response;
      parent: the position whose hidden state predicts the token (-1: none; a response's first: its prompt's last);
      segment: the token's response, numbered in order across the batch."""
    ids, positions, parent, segment, document, branch = [], [], [], [], [], []
    n = 0
    for g, (prompt, responses) in enumerate(groups):
        base, P = len(ids), len(prompt)
        ids += prompt
        positions += range(P)
        parent += [-1] * P
        segment += [-1] * P
        branch += [0] * P
        for k, y in enumerate(responses, start=1):
            start = len(ids)
            ids += y
            positions += range(P, P + len(y))
            parent += [base + P - 1] + list(range(start, start + len(y) - 1))
            segment += [n] * len(y)
            branch += [k] * len(y)
            n += 1
        document += [g] * (len(ids) - base)
    return {name: torch.tensor([x], dtype=torch.long, device=device) for name, x in (
        ("input_ids", ids), ("position_ids", positions), ("document", document), ("branch", branch),
        ("parent", parent), ("segment", segment))}


def micro_batches(ids, tokens: dict, max_records: int, max_tokens: int | None = None) -> list[list]:
    """Split record ids, in order, into micro-batches of at most `max_records` records or, given `max_tokens`, as many
    as fit in that many tokens of packed row (tokens[i]: record i's row_length); a longer record runs alone, unsplit."""
    out, size = [], 0
    for i in ids:
        if not out or (size + tokens[i] > max_tokens if max_tokens else len(out[-1]) >= max_records):
            out.append([])
            size = 0
        out[-1].append(i)
        size += tokens[i]
    return out


def pack(tokenizer, records, steps: list[list[int]], cfg) -> list[list[tuple]]:
    """Every step's records as micro-batches, laid out once before any loop: per step (a list of record ids), a list of
    (groups, ids, weight): the groups of records `ids` in order (collate_groups packs them in one row) and
    `weight`, their fraction of the step's records (their loss's weight in the step's mean). cfg: cutoff, columns
    (those the loss reads), micro_batch_size, tokens_per_micro_batch."""
    eot = end_of_turn_id(tokenizer)
    groups = {i: record_groups(tokenizer, records[i], cfg.cutoff, eot, cfg.columns) for ids in steps for i in ids}
    tokens = {i: row_length(g) for i, g in groups.items()}
    return [[([g for i in mb for g in groups[i]], mb, len(mb) / len(ids))
             for mb in micro_batches(ids, tokens, cfg.micro_batch_size, cfg.tokens_per_micro_batch)]
            for ids in steps]


def collate(sequences, pad_id) -> dict[str, torch.Tensor]:
    """Right-padded batch; response_mask marks the response tokens (the targets)."""
    T = max(len(p) + len(r) for p, r in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention = torch.zeros(len(sequences), T, dtype=torch.long)
    response = torch.zeros(len(sequences), T, dtype=torch.bool)
    for i, (p, r) in enumerate(sequences):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attention[i, :len(p) + len(r)] = 1
        response[i, len(p):len(p) + len(r)] = True
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}
