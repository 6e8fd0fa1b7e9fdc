"""The sampler: greedy parity with transformers on the real SmolLM2, batching, n samples,
stopping, seeds, and the filtering/sampling maths against formulas written here."""

import copy
import math
import random

import numpy as np
import pytest
import torch

from sso_mini.eval.judge import complete
from sso_mini.generate import (exponential_noise, generate, generate_batched, nucleus_race, sample,
                               shared_prefix_length, top_k_filter, widen)

QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colours.",
    "Explain photosynthesis to a child in two sentences, please, with one example from a garden.",
    "Give me a short list of tips for writing clear emails at work, and keep each tip under ten words.",
    "Translate 'good morning' into Spanish.",
    "You are planning a weekend trip to the mountains with two friends who have never hiked before. "
    "Suggest a simple plan for Saturday and Sunday, including what to pack and how to stay safe on the trail.",
]


@pytest.fixture(scope="module")
def chat_prompts(smollm2):
    _, tok = smollm2
    return [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def greedy32(smollm2, chat_prompts):
    """Our greedy batch of all 8 prompts (stopping on the tokenizer's stop ids)."""
    model, tok = smollm2
    return generate(model, chat_prompts, max_new_tokens=32, temperature=0, stop_ids=tok.stop_ids, progress=False)


def test_greedy_batch_equals_transformers(smollm2, hf_smollm2, chat_prompts, greedy32):
    _, tok = smollm2
    hf, _ = hf_smollm2
    assert len({len(p) for p in chat_prompts}) == len(chat_prompts)  # all lengths differ: real left padding
    stops = sorted(tok.stop_ids)
    for prompt, ours in zip(chat_prompts, greedy32):
        with torch.no_grad():  # one prompt at a time, unpadded: transformers' plain path
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
        ref = ref[0, len(prompt):].tolist()
        end = next((i for i, t in enumerate(ref) if t in tok.stop_ids), len(ref))
        assert ours == ref[:end]
    assert any(len(o) == 32 for o in greedy32) and any(len(o) < 32 for o in greedy32)  # both endings occur


def test_batched_rows_equal_rows_alone(smollm2, chat_prompts, greedy32):
    model, tok = smollm2
    for i in (0, 7):  # the shortest (most padded) and the longest prompt
        alone = generate(model, [chat_prompts[i]], max_new_tokens=32, temperature=0, stop_ids=tok.stop_ids,
                         progress=False)
        assert alone == [greedy32[i]]


def test_shared_prefix_runs_once_and_changes_nothing(smollm2, monkeypatch):
    """Few-shot prompts that differ only in their last line: the preamble is prefilled once
    (batch 1) and every row still decodes exactly as it does alone."""
    model, tok = smollm2
    preamble = "Answer with one word.\n\n" + "".join(f"Q: What colour is {t}?\nA: {c}\n\n" for t, c in
                                                    (("grass", "green"), ("the sky", "blue"), ("snow", "white")))
    prompts = [tok.encode(preamble + f"Q: {q}\nA:") for q in ("What colour is coal?", "What is 2 + 2?",
                                                               "Which animal says moo, usually on a farm?")]
    P = shared_prefix_length(prompts)
    assert P >= 40 and all(p[:P] == prompts[0][:P] for p in prompts)
    shapes = []
    run = model.hidden_states
    monkeypatch.setattr(model, "hidden_states",
                        lambda ids, *a, **k: shapes.append(tuple(ids.shape)) or run(ids, *a, **k))
    batched = generate(model, prompts, max_new_tokens=12, temperature=0, progress=False)
    own = max(len(p) - P for p in prompts)
    assert shapes[:2] == [(1, P), (3, own)]  # the prefix once, then the rows' own tokens, left-padded
    monkeypatch.undo()
    for p, ours in zip(prompts, batched):
        assert ours == generate(model, [p], max_new_tokens=12, temperature=0, progress=False)[0]
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps a token of its own
    assert shared_prefix_length([[5, 2], [1, 2]]) == 0


def test_prefill_in_chunks_changes_no_token(smollm2, chat_prompts, greedy32, monkeypatch):
    """With a small PREFILL_TOKENS the prompts are prefilled a few rows per forward (each chunk into its own
    cache, joined after), and every row decodes as it does with the whole batch prefilled at once."""
    import sso_mini.generate as gen

    model, tok = smollm2
    budget = 60
    monkeypatch.setattr(gen, "PREFILL_TOKENS", budget)
    prefills = []
    run = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda ids, *a, **k: (prefills.append(tuple(ids.shape))
                                                                       if ids.shape[1] > 1 else None) or run(ids, *a, **k))
    chunked = generate(model, chat_prompts, max_new_tokens=32, temperature=0, stop_ids=tok.stop_ids, progress=False)
    P = shared_prefix_length(chat_prompts)  # (the chat template's system header, prefilled once first)
    own = max(len(p) - P for p in chat_prompts)
    assert P > 0 and prefills[0] == (1, P)
    assert len(prefills) >= 4 and sum(rows for rows, _ in prefills[1:]) == len(chat_prompts)  # every row once
    assert all(length == own and (rows * own <= budget or rows == 1) for rows, length in prefills[1:])
    assert chunked == greedy32


def test_n_samples_share_their_prompt(smollm2, chat_prompts):
    model, _ = smollm2
    a, b = chat_prompts[2], chat_prompts[5]
    greedy = generate(model, [a, b], max_new_tokens=8, temperature=0, n=3, progress=False)
    alone = [generate(model, [p], max_new_tokens=8, temperature=0, progress=False)[0] for p in (a, b)]
    assert greedy == [alone[0]] * 3 + [alone[1]] * 3  # copied cache rows, prompt-major order
    sampled = generate(model, [a], max_new_tokens=12, temperature=1.0, n=4, seed=0, progress=False)
    assert len(sampled) == 4 and len({tuple(s) for s in sampled}) == 4


def test_generate_batched_keeps_prompt_order_and_seeds_each_batch(smollm2, chat_prompts, greedy32):
    model, tok = smollm2
    # greedy: batches of 3 sorted by length, answers back in prompt order, as every row decodes alone
    batched = generate_batched(model, chat_prompts, batch_size=3, max_new_tokens=32, temperature=0,
                               stop_ids=tok.stop_ids, progress=False)
    assert batched == greedy32
    # sampled, n per prompt: batch b (longest prompts first) is exactly generate(..., seed=seed + b)
    prompts = chat_prompts[:4]
    out = generate_batched(model, prompts, batch_size=2, seed=5, n=2, max_new_tokens=6, temperature=1.0,
                           progress=False)
    order = sorted(range(4), key=lambda i: -len(prompts[i]))
    for b in range(2):
        idx = order[2 * b:2 * b + 2]
        direct = generate(model, [prompts[i] for i in idx], seed=5 + b, n=2, max_new_tokens=6, temperature=1.0,
                          progress=False)
        for m, i in enumerate(idx):
            assert out[2 * i:2 * i + 2] == direct[2 * m:2 * m + 2]


def test_stop_ids_end_rows_and_are_not_returned(smollm2, chat_prompts):
    model, _ = smollm2
    prompts = chat_prompts[:3]
    free = generate(model, prompts, max_new_tokens=12, temperature=0, progress=False)
    assert all(len(r) == 12 for r in free)
    stop = free[0][5]  # a token row 0 produces; other rows may or may not produce it
    stopped = generate(model, prompts, max_new_tokens=12, temperature=0, stop_ids={stop}, progress=False)
    for f, s in zip(free, stopped):
        assert s == (f[:f.index(stop)] if stop in f else f)
    assert len(stopped[0]) <= 5


def test_same_seed_same_output_different_seed_different(smollm2, chat_prompts):
    model, _ = smollm2
    run = lambda seed: generate(model, chat_prompts[:2], max_new_tokens=8, temperature=1.0, top_p=0.95,  # noqa: E731
                                seed=seed, progress=False)
    first = run(1)
    assert run(1) == first
    assert run(2) != first


def test_bf16_decode_agrees_with_full_forward(smollm2, chat_prompts):
    """The cached bf16 sampler picks, at each step, a top token of the uncached bf16 forward."""
    model, _ = smollm2
    low = copy.deepcopy(model).to(torch.bfloat16)
    prompts = chat_prompts[:3]
    outs = generate(low, prompts, max_new_tokens=8, temperature=0, progress=False)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            logits = low(torch.tensor([p + o]))[0, len(p) - 1:-1].float()  # [8, V] predicting each new token
        chosen = logits.gather(1, torch.tensor(o)[:, None])[:, 0]
        assert (logits.max(-1).values - chosen <= 0.1).all()  # bf16 tolerance for near-ties


def test_complete_text(smollm2):
    model, tok = smollm2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    few_shot = "Q: What is 2 + 2?\nA: 4\nQ: What is 3 + 5?\nA:"
    out = complete(model, tok, [chat, few_shot], max_new_tokens=10, stop_strings=["\n"], progress=False)
    ref = generate(model, [tok.encode_chat(chat), tok.encode(few_shot)], max_new_tokens=10, temperature=0,
                   stop_ids=tok.stop_ids, progress=False)
    assert out == [tok.decode(r).split("\n")[0] for r in ref]
    assert out[0] == "The capital of France is Paris."
    assert "\n" not in out[1]


def test_bad_inputs(smollm2):
    model, tok = smollm2
    caches = [layer.self_attn.kv_cache for layer in model.layers]
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], max_new_tokens=4)
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt 1 has {context - 2} tokens.*max_new_tokens=4"):
        generate(model, [[1], [1] * (context - 2)], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[model.config.vocab_size]], max_new_tokens=4)
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(n=0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            generate(model, [[1, 2]], **{"max_new_tokens": 4, **bad})
    with pytest.raises(ValueError, match=r"top_k must be an int >= 0 \(0 = off\), got None"):
        generate(model, [[1, 2]], max_new_tokens=4, top_k=None)  # a type mistake gets the same kind of line
    with pytest.raises(ValueError, match="prompt 0 is a int"):
        complete(model, tok, [3], max_new_tokens=4)
    # a refused call allocates nothing: every layer keeps the cache it had
    assert all(layer.self_attn.kv_cache is c for layer, c in zip(model.layers, caches))


def test_a_call_after_an_error_samples_as_from_a_fresh_cache(smollm2, monkeypatch):
    """An error mid-decode leaves the cache's storage behind with stale keys in it; the next call (fewer rows and
    slots: the same storage) still gives the tokens a model without any cache gives."""
    model, _ = smollm2
    import sso_mini.generate as g

    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    model.clear_cache()
    fresh = generate(model, prompts[1:], max_new_tokens=4, temperature=0, progress=False)
    model.clear_cache()

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    real = g.decode_one_token
    monkeypatch.setattr(g, "decode_one_token", boom)
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, prompts, max_new_tokens=8, progress=False)
    storage = model.layers[0].self_attn.kv_cache.k_storage.data_ptr()
    monkeypatch.setattr(g, "decode_one_token", real)
    assert generate(model, prompts[1:], max_new_tokens=4, temperature=0, progress=False) == fresh
    assert model.layers[0].self_attn.kv_cache.k_storage.data_ptr() == storage
    model.clear_cache()
    assert all(layer.self_attn.kv_cache is None for layer in model.layers)


# --- filtering and sampling on fixed logits, against numpy formulas -------------------


def numpy_top_k(logits, k):
    out = np.full_like(logits, -np.inf)
    for r, row in enumerate(logits):
        keep = np.argsort(-row)[:k]
        out[r, keep] = row[keep]
    return out


def test_top_k_filter_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    for k in (1, 5, 49):
        assert np.array_equal(top_k_filter(logits, k).numpy(), numpy_top_k(logits.numpy(), k))
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 50), logits)


def chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # a token with probability 0 is never drawn
    return (((counts - expected) ** 2)[keep] / expected[keep]).sum(), keep.sum() - 1


def target_distribution(logits, temperature, top_k, top_p):
    """Written directly: temperature, keep the top-k, then the nucleus, renormalise."""
    V = len(logits)
    z = logits.numpy().astype(np.float64) / temperature
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    order = np.argsort(-p)
    kept = order[: top_k or V]
    p_k = np.zeros(V)
    p_k[kept] = p[kept] / p[kept].sum()
    cum = np.cumsum(p_k[order])
    nucleus = order[: int(np.searchsorted(cum, top_p - 1e-12) + 1)]
    target = np.zeros(V)
    target[nucleus] = p_k[nucleus] / p_k[nucleus].sum()
    return target


def close_enough(counts, target):
    stat, dof = chi_square(counts, target)
    return stat < dof + 5 * np.sqrt(2 * dof) + 10  # far beyond the 99.9% quantile for dof <= 7


@pytest.mark.parametrize("p_as_tensor", [False, True])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 4, 1.0), (1.0, 5, 0.9)])
def test_sampled_frequencies_match_distribution(temperature, top_k, top_p, p_as_tensor):
    """sample() as the first token of a batch draws it; with top-p a tensor (the compiled step's), the race
    takes its value from the tensor."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    draws = 20000
    g = torch.Generator().manual_seed(0)
    p = torch.tensor(top_p) if p_as_tensor and top_p < 1 else top_p
    counts = np.bincount(sample(logits.expand(draws, -1), g, temperature, top_k, p).numpy(), minlength=8)
    assert close_enough(counts, target_distribution(logits, temperature, top_k, top_p))


@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
def test_nucleus_race_widens_only_where_the_candidates_fall_short(top_p):
    """3 candidates per row: a peaked row's nucleus fits in them, a flat row's does not (`widen` then races
    over the whole row); mixed in one batch, each still follows its own nucleus distribution."""
    peaked = torch.tensor([3.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
    flat = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.05, 0.0, -0.1, -0.2])  # (no ties: which of two equal tokens
    # ends a nucleus is arbitrary)
    draws = 20000
    probs = torch.stack([peaked, flat]).softmax(-1).repeat(draws, 1)  # rows alternate peaked, flat
    g = torch.Generator().manual_seed(0)
    noise = exponential_noise((len(probs), 3 if top_p < 1 else 8), g, "cpu")
    token, decided = nucleus_race(probs, top_p, noise)
    tokens = widen(token, decided, probs, top_p, g).numpy()
    for row, logits in ((0, peaked), (1, flat)):
        counts = np.bincount(tokens[row::2], minlength=8)
        assert close_enough(counts, target_distribution(logits, 1.0, 0, top_p))
    if top_p == 0.5:  # the flat row's nucleus needs more than the 3 candidates: its rows, and only they, widen
        assert (target_distribution(flat, 1.0, 0, 0.5) > 0).sum() > 3
        assert decided[0::2].all() and not decided[1::2].any()


def test_greedy_sample_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample(logits, None, temperature=0).tolist() == [1, 0]


def test_compiled_decode_on_cpu_equals_eager(tiny_transformer):
    """compile=True on the CPU (inductor, fixed-shape decode step) gives the eager greedy tokens."""
    model = tiny_transformer(std=0.3)
    prompts = [[1, 5, 9, 2], [3, 4, 5, 6, 7, 8, 9]]
    eager = generate(model, prompts, max_new_tokens=6, temperature=0, progress=False)
    compiled = generate(model, prompts, max_new_tokens=6, temperature=0, progress=False, compile=True)
    assert compiled == eager and all(len(o) == 6 for o in eager)


def test_compiled_sampling_draws_what_eager_sampling_draws(tiny_transformer, monkeypatch):
    """Sampled, compiled (dynamo's "eager" backend: its graph, no code generation) and eager decoding draw the
    same noise from the same seed, so at a batch of one row bucket (8 rows, no stops: the same rows in both)
    they give the same tokens; a nucleus wider than the candidates widens."""
    import torch._dynamo

    from sso_mini import compiled
    from sso_mini import generate as gen

    torch._dynamo.reset()
    compiled.compiled_step.cache_clear()
    monkeypatch.setattr(compiled, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(compiled, "_eager_fallback", [])
    monkeypatch.setattr(gen, "NUCLEUS_CANDIDATES", 4)  # so that some steps' nucleus outgrows the candidates
    widened, real = [], gen.widen
    monkeypatch.setattr(gen, "widen", lambda token, decided, *a: widened.append(int((~decided).sum())) or
                        real(token, decided, *a))
    model = tiny_transformer(std=0.1)  # flat enough next-token distributions
    prompts = [[1, 5, 9, 2], [3, 4, 5, 6, 7, 8, 9], [2, 2], [6]]
    for top_p in (0.9, 1.0):
        runs = [generate(model, prompts, max_new_tokens=12, temperature=0.8, top_p=top_p, seed=3, n=2,
                         progress=False, compile=c) for c in (False, True)]
        assert runs[0] == runs[1] and len(set(map(tuple, runs[0]))) > 1
    assert sum(widened) > 0
    torch._dynamo.reset()
    compiled.compiled_step.cache_clear()


@pytest.mark.parametrize("compile", [False, True])
def test_shrinking_batches_give_each_prompt_its_own_greedy_tokens(tiny_transformer, monkeypatch, compile):
    """Rows that stop early are dropped from the batch (and, compiled, the batch is padded to one of
    ROW_BUCKETS and the cache to one of CACHE_BUCKETS): every row still gets exactly the greedy tokens it gets
    alone."""
    from sso_mini import compiled
    from sso_mini import generate as gen

    model = tiny_transformer(std=0.3)
    prompts = [[1 + i, 5, 9 + 2 * i, 2][: 2 + i % 3] + [7] * (i % 4) for i in range(20)]  # lengths 2-7
    alone = [generate(model, [p], max_new_tokens=12, temperature=0, progress=False)[0] for p in prompts]
    stops = {alone[i][1 + i % 3] for i in range(6)}  # ten rows meet a stop within 4 tokens
    expected = [next((a[:j] for j, x in enumerate(a) if x in stops), a) for a in alone]
    assert sum(len(e) < 4 for e in expected) >= 10 and any(len(e) == 12 for e in expected)
    shapes, original = [], gen.compact

    def spy(model, done, n, *rows):
        shapes.append(n)
        return original(model, done, n, *rows)

    monkeypatch.setattr(gen, "compact", spy)
    got = generate(model, prompts, max_new_tokens=12, temperature=0, stop_ids=stops, progress=False,
                   compile=compile)
    assert got == expected
    assert shapes and all(b & (b - 1) == 0 and b < 20 for b in shapes)  # it shrank, to powers of two
    if compile:  # ... never below the smallest row bucket
        assert min(shapes) == compiled.ROW_BUCKETS[0]


def test_fused_projections_change_no_token_and_are_dropped_after(monkeypatch):
    """Sampling on the CPU runs q, k, v (with Qwen2's biases) and gate, up as one matmul each: greedy
    tokens equal a full forward per step through the separate layers, and the fused copies go."""
    from sso_mini.config import ModelConfig
    from sso_mini.model import Attention, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, qkv_bias=True)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    used = []
    forward = Attention.forward
    monkeypatch.setattr(Attention, "forward", lambda self, *a, **k: used.append("qkv" in vars(self)) or
                        forward(self, *a, **k))
    prompt = [3, 14, 15, 9, 2, 6]
    got = generate(model, [prompt], max_new_tokens=10, temperature=0, progress=False)[0]
    assert used and all(used)  # every attention call ran fused
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]
    assert not any("qkv" in vars(layer.self_attn) or "gate_up" in vars(layer.mlp) for layer in model.layers)
    # generate_batched concatenates the weights once for all its batches, and drops them after
    seen = []
    monkeypatch.setattr(Attention, "forward", lambda self, *a, **k: seen.append(self.qkv) or
                        forward(self, *a, **k))
    batched = generate_batched(model, [prompt, prompt[:4], prompt[:2]], batch_size=1, max_new_tokens=3,
                               temperature=0, progress=False)
    assert batched[0] == got[:3]
    assert len({id(w) for w in seen}) == len(model.layers)  # one fused copy per layer across the three batches
    # (the list keeps every copy alive, so a second copy could not reuse a first one's id)
    assert not any("qkv" in vars(layer.self_attn) or "gate_up" in vars(layer.mlp) for layer in model.layers)


def test_compiled_sampler_compiles_three_graphs_whatever_the_batches(tiny_transformer, monkeypatch):
    """generate calls whose rows shrink, whose prompt lengths, token caps and sampling settings vary (greedy, top-p,
    no top-p), with the decode step compiled fullgraph=True (dynamo's "eager" backend: its graphs and guards, no
    code generation): nothing falls back to eager, the step meets more than 8 shapes, and dynamo compiles one
    graph per kind of step. The cache's storage, allocated by the first (largest) call, does not move across the
    calls; a larger call moves it and compiles nothing new."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from sso_mini import compiled

    torch._dynamo.reset()
    counters.clear()
    compiled.compiled_step.cache_clear()
    monkeypatch.setattr(compiled, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(compiled, "_eager_fallback", [])
    seen, real = set(), compiled.decode_one_token

    def spy(model, tokens, position, mask, slot, sampling):
        seen.add((tokens.shape[0], mask.shape[-1]))
        assert mask.shape[-1] == compiled.bucket(int(slot) + 1, compiled.CACHE_BUCKETS)  # the filled slots, rounded up
        return real(model, tokens, position, mask, slot, sampling)

    monkeypatch.setattr(compiled, "decode_one_token", spy)
    model = tiny_transformer(std=0.3)
    rng = random.Random(0)
    storage = set()
    calls = [(r, length, new) for r in (65, 33, 17, 9) for length, new in ((400, 200), (230, 40), (10, 8))]
    for call, (rows, length, new) in enumerate(calls + [(130, 400, 200)]):
        prompts = [[rng.randrange(3, 97) for _ in range(rng.randint(1, length))] for _ in range(rows)]
        settings = [{"temperature": 0}, {"temperature": rng.uniform(0.5, 1.3), "top_p": rng.uniform(0.5, 0.95)},
                    {"temperature": rng.uniform(0.5, 1.3), "top_k": 20}][call % 3]
        out = generate(model, prompts, max_new_tokens=new, stop_ids={5, 11, 17}, seed=call, progress=False,
                       compile=True, **settings)
        assert len(out) == rows
        storage.add(model.layers[0].self_attn.kv_cache.k_storage.data_ptr())
        if call == len(calls) - 1:
            assert len(storage) == 1  # the largest call came first: one allocation served them all
    assert len(storage) == 2 and not compiled._eager_fallback and len(seen) > 8
    assert counters["stats"]["unique_graphs"] == 3  # greedy, top-p, no top-p
    assert {r for r, _ in seen} <= set(compiled.ROW_BUCKETS) and {s for _, s in seen} <= set(compiled.CACHE_BUCKETS)


def test_the_compiled_loop_reads_the_device_once_per_8_steps(tiny_transformer, monkeypatch):
    """The host's reads of the device (tolist, item, bool, int, nonzero: each waits for a GPU to finish its queue)
    while decoding: the plain loop reads every step, the compiled one once per compiled.SYNC_EVERY steps plus a
    shrink's two nonzero calls, and both give the same greedy tokens. (The step runs eagerly here: what is counted
    is the loop's reads, not the graph's.)"""
    from sso_mini import compiled
    from sso_mini import generate as gen

    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "nonzero"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            reads.append(_name) or _real(self, *a, **k))
    monkeypatch.setattr(compiled, "decode_one_token", gen.decode_one_token)
    shrinks, real_compact = [], gen.compact
    monkeypatch.setattr(gen, "compact", lambda *a: shrinks.append(1) or real_compact(*a))
    model = tiny_transformer(std=0.3)
    prompts = [[1 + i, 5, 9 + 2 * i, 2][: 2 + i % 3] + [7] * (i % 4) for i in range(16)]
    alone = generate(model, prompts, max_new_tokens=64, temperature=0, progress=False)
    later = {x for o in alone[12:] for x in o}  # four rows go on to the cap, the others end along the way
    stops = {next((x for x in o[2:] if x not in later), None) for o in alone[:12]} - {None}
    counts = {}
    for compile in (False, True):
        reads.clear()
        shrinks.clear()
        real_decode = gen.decode
        monkeypatch.setattr(gen, "decode", lambda *a, **k: (reads.clear(), real_decode(*a, **k))[1])
        out = generate(model, prompts, max_new_tokens=64, temperature=0, stop_ids=stops, progress=False,
                       compile=compile)
        counts[compile] = (len(reads) - 2, len(shrinks), out)  # - 2: generate's tolist of the tokens, lengths
        monkeypatch.setattr(gen, "decode", real_decode)
    (plain, _, eager), (fast, shrunk, got) = counts[False], counts[True]
    steps = max(map(len, got)) + 1  # until the last row drew its stop
    assert got == eager and shrunk and steps > 2 * compiled.SYNC_EVERY
    assert plain >= steps  # every step
    assert fast <= -(-steps // compiled.SYNC_EVERY) + 2 * shrunk, (fast, shrunk)


def test_a_compile_limit_falls_back_to_eager_with_one_warning(tiny_transformer, monkeypatch):
    import torch._dynamo

    from sso_mini import compiled

    torch._dynamo.reset()
    compiled.compiled_step.cache_clear()
    monkeypatch.setattr(compiled, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(compiled, "_eager_fallback", [])
    monkeypatch.setattr(compiled, "MAX_GRAPHS", 1)  # the second kind of step (sampled) is past the limit
    model = tiny_transformer(std=0.3)
    kinds = (dict(temperature=0), dict(temperature=0.9, seed=4))  # 8 rows: one bucket, the same rows as eager
    eager = [generate(model, [[1, 2, 3]] * 8, max_new_tokens=5, progress=False, **kw) for kw in kinds]
    with pytest.warns(UserWarning, match="decoding goes on eagerly"):
        with_compile = [generate(model, [[1, 2, 3]] * 8, max_new_tokens=5, progress=False, compile=True, **kw)
                        for kw in kinds]
    assert with_compile == eager and compiled._eager_fallback == [True]
    torch._dynamo.reset()
    compiled.compiled_step.cache_clear()


def test_sampler_rows_hold_the_bucketed_cache_in_half_the_free_memory():
    """The rows a GPU batch takes, against the per-row bytes written out here for Qwen2-7B in bf16: the KV cache
    (k and v, 28 layers, 4 KV heads of 128, 2 bytes) and the step's fp32 logits, probabilities and copies."""
    from sso_mini.compiled import CACHE_BUCKETS, bucket
    from sso_mini.memory import PRESETS, SAMPLER_ROWS, sampler_rows

    config = PRESETS["Qwen2-7B"]
    for free_gib, max_len in ((70, 2600), (70, 600), (20, 2600), (1, 4000)):
        slots = bucket(max_len, CACHE_BUCKETS)  # the cache a compiled run grows to: 4096 for 2600
        per_row = 2 * 28 * 4 * 128 * slots * 2 + 16 * 152064
        rows = free_gib * 2**30 // 2 // per_row
        want = max(SAMPLER_ROWS[0], min(SAMPLER_ROWS[1], 2 ** int(math.log2(rows)) if rows else 1))
        assert sampler_rows(config, free_gib * 2**30, slots, 2) == want
    assert sampler_rows(config, 70 * 2**30, bucket(2100, CACHE_BUCKETS), 2) == 128 < \
        sampler_rows(config, 70 * 2**30, 2100, 2)  # sized by the bucket: fewer rows than the raw length allows
