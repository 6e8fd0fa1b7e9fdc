"""Batched sampling with a KV cache: many prompts, n samples each (SSO samples y+, y- and y^o every iteration, so
this loop is most of the wall time). One call's KV cache (P = the tokens all prompts share, T = P + the longest rest
of a prompt, Tmax = T + max_new_tokens):

    cache slot   0 ... P-1 | P ............... T-1 | T ............ Tmax-1
    row 0        prefix    | pad pad  rest of 0    | new tokens ->
    row 1        prefix    | rest of 1 (longest)   | new tokens ->

The shared prefix (a chat template's system header) is prefilled once; the rest of each prompt is left-padded, so
every row writes its t-th new token into slot T+t: one slot index serves the whole batch and the decode steps share
their shapes. RoPE positions count each row's real tokens only; the mask hides pad slots.
The cache is a view of a storage that stays between calls (model.KVCache), so a call allocates nothing new.

    prefill           prompt tokens run into the cache -> each row's last logits
    prefill_in_chunks the shared prefix once, then the rows a few at a time, through prefill
    decode_one_token  one new token for every row
    decode            the loop: finished rows leave the batch, the rest go on

Which token comes next (`sample` for the first, `decode_one_token` for the rest): temperature, top-k, then instead
of torch.multinomial an exponential race within the top-p nucleus: with E ~ Exp(1) per token, argmax(probs / E)
picks token i with probability probs[i], for all rows at once with fixed shapes, reproducibly from a seeded generator.
fast_cpu.py and compile=True (compiled.py) make the same steps faster without changing the tokens a seed draws.
"""

import contextlib

import torch
from tqdm.auto import tqdm

from .batches import micro_batches

# --- which token comes next ---------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept), the rest -> -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def nucleus(ranked: torch.Tensor, p):
    """[b, k] probabilities, most likely first -> [b, k] True: in the top-p nucleus (the mass ranked above is short
    of p, so the top token always stays), and [b] True: the nucleus ends within these k (their mass reaches p)."""
    cum = ranked.cumsum(dim=-1)
    return cum - ranked < p, cum[:, -1] >= p


def exponential_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Exp(1) draws, strictly positive (u is clamped away from 0; u < 1 always)."""
    u = torch.rand(shape, generator=generator, device=device)
    return u.clamp_(min=torch.finfo(u.dtype).tiny).log_().neg_()


NUCLEUS_CANDIDATES = 256  # a row's likeliest tokens that race; a wider nucleus races over the whole vocabulary


def race_width(vocab_size: int, top_p: float) -> int:
    """Exp(1) draws per row and step: one per candidate when top-p is on, one per token when it is off."""
    return min(NUCLEUS_CANDIDATES, vocab_size) if top_p < 1.0 else vocab_size


def nucleus_race(probs: torch.Tensor, p, noise: torch.Tensor):
    """The race within each row's top-p nucleus among its k = noise.size(-1) likeliest tokens: [B, V] probabilities,
    [B, k] Exp(1) draws -> [B] ids, [B] True where decided (the nucleus lies within the k; `widen` redoes the rest).
    Kept token i wins with probability probs[i] / (mass kept). Why candidates: a nucleus seldom holds more than a few
    dozen tokens, while sorting the whole vocabulary and drawing noise for each token is costly (benchmarks/README.md).
    p: a number, or a 0-d tensor (compiled: its value stays out of the graph); the number 1.0 turns top-p off."""
    if not torch.is_tensor(p) and p >= 1.0:
        return (probs / noise).argmax(dim=-1), torch.ones(len(probs), dtype=torch.bool, device=probs.device)
    k = noise.size(-1)  # top and order: [B, k], most likely first (the whole row, as `widen` asks: a sort)
    top, order = probs.topk(k, dim=-1) if k < probs.size(-1) else probs.sort(dim=-1, descending=True)
    kept, decided = nucleus(top, p)
    score = (top / noise).masked_fill(~kept, -1.0)
    return order.gather(-1, score.argmax(dim=-1, keepdim=True))[:, 0], decided


def widen(token, decided, probs, p, generator: torch.Generator):
    """Rows whose nucleus outgrew their candidates race again over the whole vocabulary (the same distribution);
    eager, since a data-dependent batch cannot be compiled."""
    if not bool(decided.all()):
        wide = probs[~decided]  # [b, V]
        token[~decided] = nucleus_race(wide, p, exponential_noise(wide.shape, generator, wide.device))[0]
    return token


def probabilities(logits, temperature, top_k: int):
    """[B, V] logits -> [B, V] fp32 probabilities after the temperature and the top-k filter."""
    return top_k_filter(logits.float() / temperature, top_k).softmax(dim=-1)


def sample(logits, generator: torch.Generator | None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Next token per row: [B, V] logits -> [B] ids. Temperature 0 is greedy (no generator needed)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_k)
    noise = exponential_noise((len(probs), race_width(probs.size(-1), top_p)), generator, probs.device)
    return widen(*nucleus_race(probs, top_p, noise), probs, top_p, generator)


# --- the KV-cache loop ----------------------------------------------------------------------

PREFILL_TOKENS = 3072  # prompt tokens per prefill forward: a CPU's activations then stay in its caches


def prefill(model, ids, positions, mask, slots):
    """Run prompts ids [B, T] (positions [B, T], mask [B, 1, T, K]: which of the cache's first K slots each token
    reads) into the cache at slots [T]; return the logits of each row's last token, [B, V]."""
    h = model.hidden_states(ids, positions, mask, slots)  # [B, T, H]
    return model.logits(h[:, -1])


def decode_one_token(model, tokens, positions, mask, slot, race):
    """Tokens [B, 1] at positions [B, 1] into cache slot [1], reading the slots `mask` [B, 1, 1, S] allows. race: None
    (greedy: [B] ids), or (noise [B, k], temperature, top_k, top_p) -> [B] ids, [B] decided, [B, V] probabilities.
    Tensors in and out, fixed shapes: it compiles (the noise is drawn outside, as a graph cannot hold a generator)."""
    logits = model.logits(model.hidden_states(tokens, positions, mask, slot)[:, -1])  # [B, V]
    if race is None:
        return logits.argmax(dim=-1)
    noise, temperature, top_k, top_p = race
    probs = probabilities(logits, temperature, top_k)  # [B, V]
    return *nucleus_race(probs, top_p, noise), probs


@torch.inference_mode()
def generate(model, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(), n=1,
             seed=None, progress=True, compile=False, desc="sampling") -> list[list[int]]:
    """Sample `n` completions per prompt: B*n lists of new token ids, prompt-major, each cut before its first stop id.
    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off. The same seed gives the same output for
    the same batch. compile=True compiles the decode step (once per process: compiled.py)."""
    check_inputs(model, prompts, dict(max_new_tokens=max_new_tokens, n=n, temperature=temperature, top_p=top_p,
                                      top_k=top_k))
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device)  # our own stream: the global RNG is left alone
    generator.seed() if seed is None else generator.manual_seed(seed)
    ids, valid, P = layout(prompts, max_new_tokens, compile, device)  # [B, T], [B, Tmax], shared prefix
    # every row and slot this call uses: the cache's storage stays from the last call, unless this one needs more
    model.setup_cache(cache_rows(len(prompts) * n, compile), valid.size(1))
    with fast_path(model, compile):  # inside generate_batched a no-op: it is on for all the batches already
        logits = prefill_in_chunks(model, ids, valid, P)  # [B, V]
        if n > 1:  # each prompt was prefilled once; its n samples start from copies of its cache rows
            model.select_cache_rows(torch.arange(len(prompts), device=device).repeat_interleave(n))
            logits, valid = logits.repeat_interleave(n, 0), valid.repeat_interleave(n, 0)
        first = sample(logits, generator, temperature, top_k, top_p)  # [rows]
        sampling = (temperature, top_k, top_p, generator)
        out, length = decode(model, first, valid, ids.size(1), max_new_tokens, sampling,
                             stop_ids=stop_ids, compile=compile, progress=progress, desc=desc)
    return [row[:k] for row, k in zip(out.tolist(), length.tolist())]


def layout(prompts, max_new_tokens: int, compile: bool, device):
    """ids [B, T] (the shared prefix, then each row's own tokens left-padded), valid [B, Tmax] (real slots), and P."""
    B = len(prompts)
    P = shared_prefix_length(prompts) if B > 1 else 0
    T = P + max(len(p) - P for p in prompts)  # slots: shared prefix, then the longest suffix
    Tmax = cache_slots(T + max_new_tokens, compile)
    ids = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, Tmax, dtype=torch.bool)
    ids[:, :P], valid[:, :P] = torch.tensor(prompts[0][:P]), True
    for i, p in enumerate(prompts):
        ids[i, T - len(p) + P:] = torch.tensor(p[P:])
        valid[i, T - len(p) + P:T] = True
    return ids.to(device), valid.to(device), P


def prefill_in_chunks(model, ids, valid, P: int):
    """Every prompt into the KV cache: the shared prefix once, then the rows' own tokens PREFILL_TOKENS at a time,
    each chunk into its rows of the cache. Returns [B, V] logits."""
    B, T = ids.shape
    positions = (valid[:, :T].long().cumsum(-1) - 1).clamp(min=0)  # [B, T] real tokens before each slot
    slots = torch.arange(T, device=ids.device)
    # real keys at or before the query's slot; a pad query sees itself only, so no softmax row is empty
    mask = (valid[:, None, None, :T] & (slots <= slots[:, None])) | (slots == slots[:, None])  # [B, 1, T, T]
    S = valid.size(1)  # the cache's slots
    if P:  # the shared prefix runs once, in row 0; its keys and values are copied to every row
        view_cache(model, 1, S)
        model.hidden_states(ids[:1, :P], positions[:1, :P], mask[:1, :, :P, :P], slots[:P])
        view_cache(model, B, S)
        for layer in model.layers:
            c = layer.self_attn.kv_cache
            c.k[1:, :, :P], c.v[1:, :, :P] = c.k[:1, :, :P], c.v[:1, :, :P]
    logits = []
    for rows in micro_batches(range(B), dict.fromkeys(range(B), T - P), B, PREFILL_TOKENS):
        r = slice(rows[0], rows[-1] + 1)
        view_cache(model, len(rows), S, first=rows[0])  # the chunk's rows of the cache
        logits.append(prefill(model, ids[r, P:], positions[r, P:], mask[r, :, P:], slots[P:]))
    view_cache(model, B, S)
    return torch.cat(logits)


def decode(model, tok, valid, T: int, max_new_tokens: int, sampling, *, stop_ids=(), compile=False,
           progress=False, desc="sampling"):
    """The loop from each row's first new token `tok` [rows], prompts in the first T cache slots: every step appends a
    token per row and ends the rows that drew a stop id; when the rows still going fit a smaller power of two, the
    batch and its cache shrink to it.
    Returns out [rows, max_new_tokens] and each row's length before its stop."""
    temperature, top_k, top_p, generator = sampling
    bar = tqdm(total=max_new_tokens, desc=desc, unit="tok", disable=not progress, leave=False)
    device, rows = tok.device, len(tok)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    if compile:  # fixed shapes, and the host reading the device once per few steps
        from . import compiled

        return compiled.decode(model, tok, valid, T, max_new_tokens, sampling, stops, bar)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    position = valid.sum(-1, keepdim=True)  # [rows, 1]: the next position = real tokens so far
    out = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    length = torch.zeros(rows, dtype=torch.long, device=device)  # tokens before the stop
    row_of = torch.arange(rows, device=device)  # [b] the output row each batch row decodes
    slot, width = torch.tensor([T], device=device), race_width(model.config.vocab_size, top_p)
    for t in range(max_new_tokens):
        tok = tok.masked_fill(done, 0)  # finished rows keep decoding pad; it is never returned
        out[row_of, t] = tok
        done = done | torch.isin(tok, stops)
        length[row_of] += ~done
        bar.update(1)
        alive = int((~done).sum()) if len(stops) else len(done)  # (no stop ids: no row ever ends)
        if t == max_new_tokens - 1 or alive == 0:
            break
        # shrink to the next power of two above the rows still going: at most log2(rows) copies of the cache
        if next_power_of_two(alive) < len(done):
            row_of, tok, valid, position, done = compact(model, done, next_power_of_two(alive), row_of, tok, valid,
                                                         position, done)
        valid.index_fill_(1, slot, True)  # the slot this token is written to
        keys = valid[:, :T + t + 1]  # the slots a step reads
        noise = None if temperature == 0 else exponential_noise((len(tok), width), generator, device)
        race = None if noise is None else (noise, temperature, top_k, top_p)
        new = decode_one_token(model, tok[:, None], position, keys[:, None, None, :], slot, race)
        tok = new if noise is None else widen(*new, top_p, generator)
        slot += 1
        position += 1
    bar.close()
    return out, length


def check_inputs(model, prompts, settings: dict):
    """ValueError naming the first setting or prompt generate() cannot take."""
    if not prompts:
        raise ValueError("generate: prompts is empty (give a list of token-id lists)")
    for name, ok, allowed in (
            ("max_new_tokens", lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
            ("n", lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
            ("temperature", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0 (0: greedy)"),
            ("top_p", lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
            ("top_k", lambda v: isinstance(v, int) and v >= 0, "an int >= 0 (0 = off)")):
        if isinstance(settings[name], bool) or not ok(settings[name]):
            raise ValueError(f"generate: {name} must be {allowed}, got {settings[name]!r}")
    V, context = model.config.vocab_size, model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"generate: prompt {i} has token ids outside the vocabulary [0, {V})")
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) + settings["max_new_tokens"] > context:
        raise ValueError(f"generate: prompt {longest} has {len(prompts[longest])} tokens; with max_new_tokens="
                         f"{settings['max_new_tokens']} it needs {len(prompts[longest]) + settings['max_new_tokens']}"
                         f" positions, more than the model's context of {context}")


def cache_slots(n: int, compile: bool) -> int:
    """The KV-cache slots n tokens take: n, or compiled the bucket that holds n (so a compiled step sees few shapes)."""
    if not compile:
        return n
    from .compiled import CACHE_BUCKETS, bucket

    return bucket(n, CACHE_BUCKETS)


def shared_prefix_length(prompts) -> int:
    """Leading tokens all prompts share, leaving each one of its own (the prefill must end on a row's last token)."""
    first, shortest = prompts[0], min(map(len, prompts))
    P = 0
    while P < shortest - 1 and all(p[P] == first[P] for p in prompts):
        P += 1
    return P


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def view_cache(model, rows: int, slots: int, first: int = 0):
    """Every layer's cache becomes a view of its storage's rows first .. first + rows - 1 (KVCache.view)."""
    for layer in model.layers:
        layer.self_attn.kv_cache.view(rows, slots, first)


def compact(model, done, n: int, *rows):
    """Keep n rows, those not `done` first, of the KV cache and of each [rows, ...] tensor in `rows`."""
    keep = torch.cat([(~done).nonzero()[:, 0], done.nonzero()[:, 0]])[:n]
    model.select_cache_rows(keep)
    return [r[keep] for r in rows]


def cache_rows(n: int, compile: bool) -> int:
    """The KV-cache rows n rows take: n, or compiled the row bucket that holds n (its spare rows included)."""
    if not compile:
        return n
    from .compiled import batch_rows

    return batch_rows(n)


def generate_batched(model, prompts, *, batch_size=None, seed=None, n=1, desc="sampling", progress=True,
                     **kw) -> list[list[int]]:
    """generate() over any number of prompts, in prompt order (n per prompt). Longest first, in batches of similar
    length: few pad slots. Batch b is seeded with seed + b, so its tokens do not depend on what earlier batches drew.
    batch_size: prompts per batch (default: default_batch_rows / n)."""
    if batch_size is None:
        longest = max(map(len, prompts)) + kw["max_new_tokens"]
        batch_size = max(1, default_batch_rows(model, longest, kw.get("compile", False)) // n)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    starts = range(0, len(order), batch_size)
    with fast_path(model, kw.get("compile", False)):  # once for every batch
        for b, start in enumerate(starts):
            idx = order[start:start + batch_size]
            done = generate(model, [prompts[i] for i in idx], seed=None if seed is None else seed + b, n=n,
                            desc=f"{desc} (batch {b + 1}/{len(starts)}, {len(idx)} rows)", progress=progress, **kw)
            for m, i in enumerate(idx):
                out[i] = done[m * n:(m + 1) * n]
    return [ids for per_prompt in out for ids in per_prompt]


CPU_BATCH_ROWS = 48  # more rows per batch buy a CPU little: its matmuls are already large enough


def default_batch_rows(model, max_len: int, compile: bool = False) -> int:
    """Rows per sampling batch: CPU_BATCH_ROWS on a CPU; on a GPU, what half its free memory holds for a KV cache of
    max_len slots (compiled: its bucket; memory.py)."""
    weight = model.embed_tokens.weight
    if weight.device.type != "cuda":
        return CPU_BATCH_ROWS
    from .memory import free_bytes, sampler_rows

    return sampler_rows(model.config, free_bytes(weight.device), cache_slots(max_len, compile), weight.element_size())


def fast_path(model, compile: bool):
    """Eager sampling: fast_cpu.py's oneDNN matmuls (faster on a CPU, no-op on a GPU); a compiled step picks its own."""
    if compile:
        return contextlib.nullcontext()
    from .fast_cpu import fast_cpu

    return fast_cpu(model)
