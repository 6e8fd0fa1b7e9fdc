"""Compiled decoding (generate(compile=True), on a GPU): the decode step of generate.py through torch.compile.

A compiled step keeps every shape in a fixed set, so a run compiles a bounded number of graphs (and on a GPU
records as many CUDA graphs): rows are a power of two from 8 to 512 (a batch shrinks by halves, and never
below 8 rows, which decode as fast as 1 on a GPU); the cache holds a power of two of slots from 256 on, and a
step reads its filled slots rounded up to one; the temperature and top-p are tensors, not constants of the
graph. So greedy and sampled decoding each compile at most MAX_GRAPHS graphs, and dynamo's recompile limit is
raised to that. Should a limit ever be hit, decoding goes on eagerly, with one warning.
"""

import functools
import warnings

import torch
import torch.nn.functional as F

from . import generate

ROW_BUCKETS = tuple(2**i for i in range(3, 10))  # 8 .. 512
CACHE_BUCKETS = tuple(2**i for i in range(8, 16))  # 256 .. 32768 slots
MAX_GRAPHS = len(ROW_BUCKETS) * len(CACHE_BUCKETS)
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

    generate.remap_cache(model, spare)
    return spare(tok), spare(valid), spare(position), torch.cat([done, done.new_ones(extra)])


def grown_cache(model, valid, filled: int):
    """The key mask of a compiled step: the whole cache, grown a bucket at a time once `filled` slots no
    longer fit, so a step reads its filled slots rounded up to a bucket (contiguous: a graph is specialised
    on its inputs' strides too)."""
    size = model.layers[0].self_attn.kv_cache.k.size(2)
    if filled > size:
        size = bucket(filled, CACHE_BUCKETS)
        generate.remap_cache(model, lambda c: F.pad(c, (0, 0, 0, size - c.size(2))))  # new slots empty
    return valid[:, :size].contiguous()


@functools.cache
def compiled_step(cuda: bool, backend: str):
    """decode_one_token compiled once per process; on a GPU "reduce-overhead" replays it as CUDA graphs."""
    if cuda:  # tune the block sizes of the one-row matmul reductions (as gpt-fast does): ~+4% tokens/s
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    return torch.compile(generate.decode_one_token, fullgraph=True, backend=backend, mode=mode)


def decode_one_token(model, *args):
    """decode_one_token through its compiled graph, with dynamo's recompile limit at MAX_GRAPHS; eager (with
    one warning, then for good) if a limit is hit anyway."""
    if not _eager_fallback:
        from torch._dynamo.exc import FailOnRecompileLimitHit

        try:
            with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS):
                return compiled_step(model.embed_tokens.weight.is_cuda, COMPILE_BACKEND)(model, *args)
        except FailOnRecompileLimitHit as e:
            warnings.warn(f"sso-mini: the compiled decode step hit a compile limit ({e}); decoding goes on eagerly")
            _eager_fallback.append(True)
    return generate.decode_one_token(model, *args)
