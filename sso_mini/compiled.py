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
