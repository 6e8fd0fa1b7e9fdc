"""Batched sampling with a static KV cache: many prompts, n samples each, fixed shapes.

SSO samples three responses per prompt every iteration (y+, y-, y^o), so this loop is
most of the wall time. One call lays the batch out like this (T = longest prompt,
Tmax = T + max_new_tokens):

    cache slot   0 ............ T-1 | T ............ Tmax-1
    row 0        pad pad  prompt 0  | new tokens ->
    row 1        prompt 1 (longest) | new tokens ->

Prompts are left-padded, so every row writes its t-th new token into the same slot T+t:
one `input_pos` serves the whole batch and the decode steps share their shapes (input
[B, 1], mask [B, 1, 1, S], S = the slots read), which is what torch.compile / CUDA graphs
need. RoPE positions count each row's real tokens only, and a boolean key mask hides pad
slots.

When every prompt starts with the same P tokens (a few-shot preamble, a chat template's
system header), those sit in slots 0..P-1 of every row, the padding goes between them and
each row's own suffix, and the prefix is prefilled once and its keys/values copied to all
rows: the feature-selection batch (a ~360-token shared preamble) prefills ~12x fewer tokens.

    row 0        shared prefix | pad pad suffix 0 | new tokens ->
    row 1        shared prefix | suffix 1 (long)  | new tokens ->
"""

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batches import micro_batches
from .model import Projection, project
from .sampling import exponential_noise, nucleus_race, probabilities, race_width, sample, widen


def decode_step(model, tokens, input_pos, position_ids, mask, noise, temperature, top_k, top_p):
    """One sampled token for every row; tensors only and fixed shapes, so it can be compiled.

    tokens [B, 1], input_pos [1] (the cache slot written), position_ids [B, 1],
    mask [B, 1, 1, S] (keys: the first S cache slots), noise [B, k] Exp(1) draws (drawn outside: a graph
    cannot hold the generator) -> next tokens [B], [B] decided, [B, V] probabilities (for `widen`).
    """
    h = model.hidden_states(tokens, position_ids, mask, input_pos)  # [B, 1, H]
    probs = probabilities(project(h[:, -1], model.lm_head_weight), temperature, top_k)  # [B, V]
    return *nucleus_race(probs, top_p, noise), probs


def greedy_step(model, tokens, input_pos, position_ids, mask):
    """decode_step at temperature 0: the most likely token of every row, [B]; its own compiled graphs."""
    h = model.hidden_states(tokens, position_ids, mask, input_pos)  # [B, 1, H]
    return project(h[:, -1], model.lm_head_weight).argmax(dim=-1)


# Compiled decoding keeps every shape in a fixed set, so a run compiles a bounded number of graphs (and on a GPU
# records as many CUDA graphs): rows are a power of two from 8 to 512 (a batch shrinks by halves, and never
# below 8 rows, which decode as fast as 1 on a GPU); the cache holds a power of two of slots from 256 on, and a
# step reads its filled slots rounded up to one (not the whole cache); the temperature and top-p are tensors,
# not constants of the graph. So greedy and sampled decoding each compile at most len(ROW_BUCKETS) x
# len(CACHE_BUCKETS) graphs, per top-k and top-p on or off (top-k off and top-p on in every sso-mini run), and
# dynamo's recompile limit is raised to that. Should a limit ever be hit, decoding goes on eagerly, with one warning.
ROW_BUCKETS = tuple(2**i for i in range(3, 10))  # 8 .. 512
CACHE_BUCKETS = tuple(2**i for i in range(8, 16))  # 256 .. 32768 slots
MAX_GRAPHS = len(ROW_BUCKETS) * len(CACHE_BUCKETS)


def bucket(n: int, buckets: tuple) -> int:
    """The smallest bucket that holds n (past the largest, the next power of two)."""
    return next((b for b in buckets if b >= n), next_power_of_two(n))


@functools.cache
def compiled_steps(cuda: bool, backend: str = "inductor") -> dict:
    """{"greedy": step, "sampled": step}, compiled once per process; on a GPU "reduce-overhead" replays each
    step as a CUDA graph."""
    if cuda:  # tune the block sizes of the one-row matmul reductions (as gpt-fast does): ~+4% tokens/s
        import torch._inductor.config as inductor_config  # (a bare `import torch...` here would shadow torch)

        inductor_config.coordinate_descent_tuning = True
    options = dict(fullgraph=True, backend=backend, mode="reduce-overhead" if cuda and backend == "inductor" else None)
    return {"greedy": torch.compile(greedy_step, **options), "sampled": torch.compile(decode_step, **options)}


COMPILE_BACKEND = "inductor"  # the tests compile with "eager" (dynamo's graphs and guards, no code generation)
_eager_fallback = []  # set once a compiled step hit a limit: decoding goes on eagerly for this process


def compiled_or_eager(kind: str, device, *args):
    """One decode step through the compiled graph of its kind, with dynamo's recompile limit at MAX_GRAPHS;
    eager (with one warning, then for good) if a limit is hit anyway."""
    if not _eager_fallback:
        from torch._dynamo.exc import FailOnRecompileLimitHit

        try:
            with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS):
                return compiled_steps(device.type == "cuda", COMPILE_BACKEND)[kind](*args)
        except FailOnRecompileLimitHit as e:
            warnings.warn(f"sso-mini: the compiled decode step hit a compile limit ({e}); decoding goes on eagerly")
            _eager_fallback.append(kind)
    return greedy_step(*args) if kind == "greedy" else decode_step(*args)


def check_inputs(model, prompts, max_new_tokens, temperature, top_p, top_k, n):
    if not prompts:
        raise ValueError("generate: prompts is empty (give a list of token-id lists)")
    for name, value, ok, allowed in (
            ("max_new_tokens", max_new_tokens, lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
            ("n", n, lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
            ("temperature", temperature, lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0 (0: greedy)"),
            ("top_p", top_p, lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
            ("top_k", top_k, lambda v: isinstance(v, int) and v >= 0, "an int >= 0 (0 = off)")):
        if isinstance(value, bool) or not ok(value):
            raise ValueError(f"generate: {name} must be {allowed}, got {value!r}")
    V, context = model.config.vocab_size, model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"generate: prompt {i} has token ids outside the vocabulary [0, {V})")
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) + max_new_tokens > context:
        raise ValueError(
            f"generate: prompt {longest} has {len(prompts[longest])} tokens; with max_new_tokens="
            f"{max_new_tokens} it needs {len(prompts[longest]) + max_new_tokens} positions, "
            f"more than the model's context of {context}"
        )


def shared_prefix_length(prompts) -> int:
    """How many leading tokens all prompts share, leaving each at least one token of its own
    (the prefill must end on a row's own last token)."""
    first, shortest = prompts[0], min(map(len, prompts))
    P = 0
    while P < shortest - 1 and all(p[P] == first[P] for p in prompts):
        P += 1
    return P


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


PREFILL_TOKENS = 3072  # prompt tokens per prefill forward: a small model's [tokens, intermediate] activations then
# fit a CPU's last-level cache, and fresh allocations stay below the size glibc maps anew (and the kernel zeroes) each
# time; a whole 48-prompt batch at once is slower (benchmarks/README.md)


def remap_cache(model, fn):
    """Replace every layer's cached keys and values, [B, Hkv, slots, D] each, by fn(them): rows dropped,
    copied or added, slots added."""
    for layer in model.layers:
        cache = layer.self_attn.kv_cache
        cache.k, cache.v = fn(cache.k), fn(cache.v)


def compact(model, keep, *rows):
    """Keep only rows `keep` of the KV cache and of each [rows, ...] tensor in `rows`."""
    remap_cache(model, lambda c: c[keep])
    return [r[keep] for r in rows]


@contextlib.contextmanager
def fused_projections(model):
    """While sampling on the CPU: q, k, v and gate, up each run as one matmul over concatenated weights.

    Why: at a few rows per step a matmul only streams its weights, and the CPU kernels stream
    small matrices well below the memory's rate; fewer, larger ones read faster (benchmarks/
    README.md). Every output is the same dot product, so the tokens do not change. The copies
    (about 70% of the weights) live until the block ends; inside a block already fused, nothing
    happens. Not for LoRA layers (their update is separate) nor on a GPU (the compiled step fuses
    on its own).
    """
    a, m = model.layers[0].self_attn, model.layers[0].mlp  # (adapters go on every layer alike)
    plain = all(type(p) is Projection for p in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj))
    if model.embed_tokens.weight.device.type != "cpu" or a.qkv is not None or not plain:
        yield
        return
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        a.qkv = (torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), bias)
        m.gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight])
    try:
        yield
    finally:
        for layer in model.layers:
            layer.self_attn.qkv, layer.mlp.gate_up = None, None


@torch.inference_mode()
def generate(model, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(), n=1,
             seed=None, progress=True, compile=False, desc="sampling") -> list[list[int]]:
    """Sample `n` completions for each prompt (lists of token ids).

    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off. Returns B*n lists
    of new token ids, prompt-major (prompt 0's n samples first); a row ends at its first stop
    id, which is not included. The same seed gives the same output for the same batch.
    compile=True compiles the decode step (CUDA graphs on a GPU; the first call per shape
    pays the compile). desc labels the progress bar.

    Finished rows are not paid for to the end: once half the rows have stopped, the batch
    shrinks to the next power of two above the rows still going (their cache rows move, the
    others are dropped), so a batch decodes at most log2(B) shapes. Compiled, the batch, the
    cache and the slots a step reads are rounded up to ROW_BUCKETS and CACHE_BUCKETS, so that batches
    of any size and prompt length reuse a bounded set of graphs (MAX_GRAPHS each for greedy and
    sampled decoding). Eager or compiled, a seed gives the same draws: the Exp(1) noise of a step is
    drawn outside the step, for its NUCLEUS_CANDIDATES most likely tokens per row.
    """
    check_inputs(model, prompts, max_new_tokens, temperature, top_p, top_k, n)
    device = model.embed_tokens.weight.device
    B = len(prompts)
    P = shared_prefix_length(prompts) if B > 1 else 0
    T = P + max(len(p) - P for p in prompts)  # slots: shared prefix, then the longest suffix
    Tmax = T + max_new_tokens
    if compile:
        Tmax = bucket(Tmax, CACHE_BUCKETS)
    ids = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, Tmax, dtype=torch.bool)  # which cache slots hold real tokens
    ids[:, :P], valid[:, :P] = torch.tensor(prompts[0][:P]), True
    for i, p in enumerate(prompts):
        ids[i, T - len(p) + P:] = torch.tensor(p[P:])
        valid[i, T - len(p) + P:T] = True
    ids, valid = ids.to(device), valid.to(device)
    position_ids = (valid[:, :T].long().cumsum(-1) - 1).clamp(min=0)  # [B, T]

    # prefill mask [B, 1, T, T]: real keys at or before the query's slot; pad queries see
    # themselves only, so no softmax row is empty (their outputs are never used)
    slots = torch.arange(T, device=device)
    query = slots[:, None]  # [T, 1]
    mask = (valid[:, None, None, :T] & (slots <= query)) | (slots == query)

    generator = torch.Generator(device=device)  # our own stream: the global RNG is left alone
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    width = race_width(model.config.vocab_size, top_p)
    settings = (  # compiled: temperature and top-p as tensors, not graph constants (top-p off stays the number 1.0)
        (torch.tensor(float(temperature), device=device), top_k,
         torch.tensor(float(top_p), device=device) if top_p < 1.0 else 1.0) if compile else (temperature, top_k, top_p))

    def step(tokens, input_pos, position, keys):  # one decode step, compiled or eager, greedy or sampled -> [rows]
        kind = "greedy" if temperature == 0 else "sampled"
        sampling = () if temperature == 0 else (exponential_noise((len(tokens), width), generator, device), *settings)
        args = (model, tokens, input_pos, position, keys, *sampling)
        if compile:
            out = compiled_or_eager(kind, device, *args)
        else:
            out = greedy_step(*args) if kind == "greedy" else decode_step(*args)
        return out.clone() if kind == "greedy" else widen(out[0].clone(), *out[1:], top_p, generator)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    with fused_projections(model):  # (a no-op inside generate_batched, which fused them for all its batches)
        try:
            if P:  # the shared prefix runs once, at batch 1
                model.setup_cache(1, P)
                model.hidden_states(ids[:1, :P], position_ids[:1, :P], mask[:1, :, :P, :P], slots[:P])
                prefix_kv = [(layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v) for layer in model.layers]
            cache_len = bucket(T + 1, CACHE_BUCKETS) if compile else Tmax  # compiled: grows a bucket at a time
            model.setup_cache(B, cache_len)
            if P:  # every row gets the prefix's keys and values, then only the suffixes run
                for layer, (k, v) in zip(model.layers, prefix_kv):
                    layer.self_attn.kv_cache.k[:, :, :P] = k  # [1, Hkv, P, D] -> all B rows
                    layer.self_attn.kv_cache.v[:, :, :P] = v
            # the rows' own tokens, packed end to end: no compute on left padding; a few rows per forward
            # (PREFILL_TOKENS), so that a CPU's activations stay in its caches
            lengths = [len(p) - P for p in prompts]
            logits = []
            for chunk in micro_batches(range(B), dict(enumerate(lengths)), B, PREFILL_TOKENS):
                own = torch.tensor([[t for i in chunk for t in prompts[i][P:]]], device=device)  # [1, N]
                own_pos = torch.cat([position_ids[i, T - lengths[i]:] for i in chunk])[None]  # [1, N]
                own_at = torch.cat([torch.stack([torch.full((lengths[i],), i, device=device), slots[T - lengths[i]:]])
                                    for i in chunk], dim=1)  # [2, N] cache row and slot
                pieces = [mask[i:i + 1, :, T - lengths[i]:] for i in chunk]  # [1, 1, L, T] each
                h = model.hidden_states(own, own_pos, pieces, own_at)  # [1, N, H]
                last = torch.tensor([lengths[i] for i in chunk], device=device).cumsum(0) - 1  # each row's last token
                logits.append(project(h[0, last], model.lm_head_weight))  # [rows, V]
            logits = torch.cat(logits)  # [B, V]
            if n > 1:  # each prompt was prefilled once; its n samples start from copies of its cache rows
                remap_cache(model, lambda c: c.repeat_interleave(n, 0))
                logits, valid = logits.repeat_interleave(n, 0), valid.repeat_interleave(n, 0)
            rows = B * n
            position = valid.sum(-1, keepdim=True)  # [rows, 1]: next position = real tokens so far
            input_pos = torch.tensor([T], device=device)
            done = torch.zeros(rows, dtype=torch.bool, device=device)
            tok = sample(logits, generator, temperature, top_k, top_p)  # [rows]
            if compile and bucket(rows, ROW_BUCKETS) > rows:  # spare rows (copies of row 0), finished from the start
                extra = bucket(rows, ROW_BUCKETS) - rows

                def spare(x):  # [rows, ...] -> [rows + extra, ...]
                    return torch.cat([x, x[:1].expand(extra, *x.shape[1:])])
                tok, valid, position = spare(tok), spare(valid), spare(position)
                done = torch.cat([done, torch.ones(extra, dtype=torch.bool, device=device)])
                remap_cache(model, spare)
            out = torch.zeros(len(done), max_new_tokens, dtype=torch.long, device=device)  # spare rows: dropped
            length = torch.zeros(len(done), dtype=torch.long, device=device)  # tokens before the stop
            row_of = torch.arange(len(done), device=device)  # [b] the output row each batch row decodes
            bar = tqdm(total=max_new_tokens, desc=desc, unit="tok", disable=not progress, leave=False)
            for t in range(max_new_tokens):
                tok = tok.masked_fill(done, 0)  # finished rows keep decoding pad; it is never returned
                out[row_of, t] = tok
                done = done | torch.isin(tok, stops)
                length[row_of] += ~done
                bar.update(1)
                if t == max_new_tokens - 1:
                    break
                if len(stops):  # (no stops: no row finishes, and the step needs no look at `done`)
                    alive = int((~done).sum())
                    if alive == 0:
                        break
                    shrunk = bucket(alive, ROW_BUCKETS) if compile else next_power_of_two(alive)
                    if shrunk < len(done):  # shrink to the next power of two above the rows still going
                        keep = torch.cat([(~done).nonzero()[:, 0], done.nonzero()[:, 0]])[:shrunk]
                        row_of, tok, valid, position, done = compact(model, keep, row_of, tok, valid, position, done)
                valid.index_fill_(1, input_pos, True)  # the slot this token is written to
                # the mask's length is the number of cache slots attended: the filled ones; compiled, the whole
                # cache, which grows a bucket at a time, so that a step reads the filled slots rounded up to a
                # bucket and its graph sees no other length (the mask made contiguous: a graph is also
                # specialised on its inputs' strides)
                if compile and T + t + 1 > cache_len:
                    cache_len = bucket(T + t + 1, CACHE_BUCKETS)
                    remap_cache(model, lambda c: F.pad(c, (0, 0, 0, cache_len - c.size(2))))  # new slots empty
                keys = valid[:, :cache_len].contiguous() if compile else valid[:, :T + t + 1]
                tok = step(tok[:, None], input_pos, position, keys[:, None, None, :])
                input_pos += 1
                position += 1
            bar.close()
        finally:
            model.clear_cache()
    return [row[:k] for row, k in zip(out[:rows].tolist(), length[:rows].tolist())]


CPU_BATCH_ROWS = 48  # more rows per batch buy a CPU little: its matmuls are already large enough
GPU_BATCH_ROWS = (8, 512)  # a GPU's decode step is bound by reading the weights until well past 128 rows


def default_batch_rows(model, max_len: int) -> int:
    """Rows per sampling batch: CPU_BATCH_ROWS on the CPU; on a GPU as many as half its free memory holds
    (KV cache of max_len slots, and the step's fp32 logits and noise, per row), a power of two in GPU_BATCH_ROWS."""
    weight = model.embed_tokens.weight
    if weight.device.type != "cuda":
        return CPU_BATCH_ROWS
    c = model.config
    per_row = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * max_len * weight.element_size()
    per_row += 4 * 4 * c.vocab_size  # logits, probabilities and their copies (noise: NUCLEUS_CANDIDATES, or V)
    rows = torch.cuda.mem_get_info(weight.device)[0] // 2 // per_row
    return max(GPU_BATCH_ROWS[0], min(GPU_BATCH_ROWS[1], 1 << max(int(rows).bit_length() - 1, 0)))


def generate_batched(model, prompts, *, batch_size=None, seed=None, n=1, desc="sampling", progress=True,
                     **kw) -> list[list[int]]:
    """generate() over any number of prompts, in prompt order (n per prompt, prompt-major).

    Longest first, in batches of similar length: few pad slots in the KV cache. Batch b is
    seeded with seed + b, so a run is reproducible whatever the batch it lands in holds.
    batch_size: prompts per batch (default: default_batch_rows / n).
    """
    if batch_size is None:
        batch_size = max(1, default_batch_rows(model, max(map(len, prompts)) + kw["max_new_tokens"]) // n)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    starts = range(0, len(order), batch_size)
    with fused_projections(model):  # once for every batch
        for b, start in enumerate(starts):
            idx = order[start:start + batch_size]
            done = generate(model, [prompts[i] for i in idx], seed=None if seed is None else seed + b, n=n,
                            desc=f"{desc} (batch {b + 1}/{len(starts)}, {len(idx)} rows)", progress=progress, **kw)
            for m, i in enumerate(idx):
                out[i] = done[m * n:(m + 1) * n]
    return [ids for per_prompt in out for ids in per_prompt]


def complete(model, tokenizer, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, n=1, seed=None,
             stop_strings=(), progress=True) -> list[str]:
    """Text in, text out: each prompt is raw text (used as is, e.g. few-shot) or a list of chat
    messages (rendered with the chat template). Returns n strings per prompt, in prompt order,
    each cut before the first of `stop_strings`."""
    if any(not s for s in stop_strings):
        raise ValueError("complete: stop_strings contains an empty string")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids.append(tokenizer.encode(p))
        elif isinstance(p, list) and all(isinstance(m, dict) for m in p):
            ids.append(tokenizer.encode_chat(p, add_generation_prompt=True))
        else:
            raise ValueError(f"complete: prompt {i} is a {type(p).__name__}; expected text or a list of messages")
    outs = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    stop_ids=tokenizer.stop_ids, n=n, seed=seed, progress=progress)
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return [min((t.split(s, 1)[0] for s in stop_strings), key=len, default=t) for t in texts]
