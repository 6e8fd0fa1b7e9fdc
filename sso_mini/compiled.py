"""Compiled decoding (generate(compile=True), on a GPU): the decode step of generate.py through torch.compile.

A run compiles one graph per kind of step (greedy, top-p, no top-p): the rows and the slots a step reads are
dynamic dimensions, of the inputs and of the KV cache's views alike, and the temperature and top-p are tensors,
not constants of the graph. Shapes still come from a fixed set, since on a GPU each shape records its own CUDA
graph: rows are a power of two from 8 to 512 (a batch shrinks by halves, and never below 8 rows, which decode as
fast as 1 on a GPU), the cache a power of two of slots from 256 on, and a step reads its filled slots rounded up
to one. Should a compile limit ever be hit, decoding goes on eagerly, with one warning."""

import functools
import warnings

import torch

from . import generate

ROW_BUCKETS = tuple(2**i for i in range(3, 10))  # 8 .. 512
CACHE_BUCKETS = tuple(2**i for i in range(8, 16))  # 256 .. 32768 slots
GRAPHS = 3  # the graphs a run compiles: one per kind of step (greedy, top-p, no top-p)
MAX_GRAPHS = 8  # dynamo's recompile limit for the step: room beyond GRAPHS, should a torch version need it
COMPILE_BACKEND = "inductor"  # the tests compile with "eager" (dynamo's graphs and guards, no code generation)
_eager_fallback = []  # set once a compiled step hit a limit: decoding goes on eagerly for this process


def bucket(n: int, buckets: tuple) -> int:
    """The smallest bucket that holds n (past the largest, the next power of two)."""
    return next((b for b in buckets if b >= n), generate.next_power_of_two(n))


def batch_rows(alive: int) -> int:
    """The rows a batch keeps for `alive` unfinished ones: a row bucket."""
    return bucket(alive, ROW_BUCKETS)


def as_tensors(settings: tuple, device) -> tuple:
    """(temperature, top_k, top_p) with the temperature and top-p as tensors (top-p off stays the number 1.0)."""
    temperature, top_k, top_p = settings
    return (torch.tensor(float(temperature), device=device), top_k,
            torch.tensor(float(top_p), device=device) if top_p < 1.0 else 1.0)


def spare_rows(model, tok, valid, position, done):
    """Add rows (copies of row 0, finished from the start) up to the next row bucket."""
    extra = bucket(len(tok), ROW_BUCKETS) - len(tok)

    def spare(x):  # [rows, ...] -> [rows + extra, ...]
        return torch.cat([x, x[:1].expand(extra, *x.shape[1:])])

    model.select_cache_rows(spare(torch.arange(len(tok), device=tok.device)))
    return spare(tok), spare(valid), spare(position), torch.cat([done, done.new_ones(extra)])


def step_mask(valid, filled: int):
    """The key mask of a compiled step: the first `filled` slots rounded up to a bucket (so a batch meets a few
    shapes, each one CUDA graph), contiguous (a graph is specialised on its inputs' strides too)."""
    return valid[:, :bucket(filled, CACHE_BUCKETS)].contiguous()


SYNC_EVERY = 8  # decode steps per read of the device by the host (a read waits for the GPU to finish its queue)


def decode(model, tok, valid, T: int, max_new_tokens: int, sampling, stops, bar):
    """generate.decode with the compiled step: fixed shapes (spare rows up to a row bucket, the sampling settings as
    tensors), and the host reading the device once per window of SYNC_EVERY steps, not every step. Rows that end
    leave the batch at the window's end. A window in which a live row's nucleus outgrew its candidates (rare) is
    decoded again from its start, reading every step to widen those rows: the tokens are those of reading every
    step, and a row's noise does not depend on when the batch shrinks."""
    rows, generator = len(tok), sampling[3]
    done = torch.zeros(rows, dtype=torch.bool, device=tok.device)
    tok, valid, position, done = spare_rows(model, tok, valid, valid.sum(-1, keepdim=True), done)
    w = Window(model, sampling, stops, T, max_new_tokens, len(done))
    state, t = dict(tok=tok, valid=valid, position=position, done=done), 0
    while True:
        end = min(t + SYNC_EVERY, max_new_tokens)
        start = generator.get_state(), {k: v.clone() for k, v in state.items()}, w.length.clone()
        cut = w.steps(state, t, end, widen_now=False)
        alive, cut = torch.stack([(~state["done"]).sum(), cut]).tolist()  # the window's one read
        if cut:  # again, widening as it goes
            generator.set_state(start[0])
            state, w.length = start[1], start[2]
            w.steps(state, t, end, widen_now=True)
            alive = int((~state["done"]).sum())
        bar.update(end - t)
        t = end
        if t == max_new_tokens or alive == 0:
            break
        if batch_rows(alive) < len(state["done"]):  # shrink to the row bucket of the rows still going
            w.row_of, *rest = generate.compact(model, state["done"], batch_rows(alive), w.row_of, *state.values())
            state = dict(zip(state, rest))
    bar.close()
    return w.out[:rows], w.length[:rows]


class Window:
    """The decode's output rows, and its steps from t0 to t1 without reading the device."""

    def __init__(self, model, sampling, stops, T: int, max_new_tokens: int, rows: int):
        temperature, top_k, top_p, self.generator = sampling
        self.model, self.stops, self.T, self.max_new_tokens, self.top_p = model, stops, T, max_new_tokens, top_p
        device = stops.device
        self.race = None if temperature == 0 else as_tensors((temperature, top_k, top_p), device)
        self.width = generate.race_width(model.config.vocab_size, top_p)
        self.out = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)  # spare rows: dropped
        self.length = torch.zeros(rows, dtype=torch.long, device=device)  # tokens before the stop
        self.row_of = torch.arange(rows, device=device)  # [b] the output row each batch row decodes

    def steps(self, s: dict, t0: int, t1: int, widen_now: bool):
        """Steps t0 .. t1 - 1 on state s (tok, valid, position, done), in place. Returns a [] bool tensor: whether
        a live row's nucleus outgrew its candidates (widen_now: widened at once, reading the device)."""
        cut = torch.zeros((), dtype=torch.bool, device=self.stops.device)
        slot = torch.full((1,), self.T + t0, device=self.stops.device)
        for t in range(t0, t1):
            tok = s["tok"].masked_fill(s["done"], 0)  # finished rows keep decoding pad; it is never returned
            self.out[self.row_of, t] = tok
            s["done"] = s["done"] | torch.isin(tok, self.stops)
            self.length[self.row_of] += ~s["done"]
            if t == self.max_new_tokens - 1:
                break
            s["valid"].index_fill_(1, slot, True)  # the slot this token is written to
            noise = None if self.race is None else \
                generate.exponential_noise((len(tok), self.width), self.generator, tok.device)
            new = decode_one_token(self.model, tok[:, None], s["position"], step_mask(s["valid"], self.T + t + 1)
                                   [:, None, None, :], slot, None if noise is None else (noise, *self.race))
            if noise is None:  # (clone: a CUDA graph's outputs live in memory its next replay overwrites)
                s["tok"] = new.clone()
            else:
                token, decided, probs = new[0].clone(), new[1] | s["done"], new[2]  # finished rows: never widened
                s["tok"] = generate.widen(token, decided, probs, self.top_p, self.generator) if widen_now else token
                cut = cut | ~decided.all()
            slot += 1
            s["position"] = s["position"] + 1
        return cut


@functools.cache
def compiled_step(cuda: bool, backend: str):
    """decode_one_token compiled once per process; on a GPU "reduce-overhead" replays it as CUDA graphs."""
    if cuda:  # tune the block sizes of the one-row matmul reductions (as gpt-fast does): ~+4% tokens/s
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    return torch.compile(generate.decode_one_token, fullgraph=True, backend=backend, mode=mode)


def mark_dynamic(model, tokens, positions, mask, race):
    """Rows and slots as dynamic dimensions, so that one graph serves every batch: the step's inputs (new tensors
    each step) and the KV cache's views (new after each shrink: marked once each)."""
    for t in (tokens, positions, mask, *(race[:1] if race else ())):
        torch._dynamo.mark_dynamic(t, 0)  # rows
    torch._dynamo.mark_dynamic(mask, 3)  # the slots a step reads
    first = model.layers[0].self_attn.kv_cache
    if getattr(first, "marked", None) is not first.k:
        for layer in model.layers:
            for t in (layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v):  # [rows, Hkv, slots, D]
                torch._dynamo.mark_dynamic(t, 0)
                torch._dynamo.mark_dynamic(t, 2)
        first.marked = first.k


def decode_one_token(model, tokens, positions, mask, slot, race):
    """decode_one_token through its compiled graph: one per kind of step (greedy, top-p, no top-p), whatever the
    batch's rows and slots. Eager (with one warning, then for good) if a compile limit is hit anyway."""
    args = (tokens, positions, mask, slot, race)
    if not _eager_fallback:
        from torch._dynamo.exc import FailOnRecompileLimitHit

        mark_dynamic(model, tokens, positions, mask, race)
        try:  # dynamo would take the cache's views, module buffers, as fixed in shape
            with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS, force_parameter_static_shapes=False,
                                            force_nn_module_property_static_shapes=False):
                return compiled_step(model.embed_tokens.weight.is_cuda, COMPILE_BACKEND)(model, *args)
        except FailOnRecompileLimitHit as e:
            warnings.warn(f"sso-mini: the compiled decode step hit a compile limit ({e}); decoding goes on eagerly")
            _eager_fallback.append(True)
    return generate.decode_one_token(model, *args)
