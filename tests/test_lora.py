"""LoRA on tiny random Llama / Qwen2 models: zero start, frozen base, merge, reference, resume."""

import argparse

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sso_mini.checkpoint import load_model, save_model
from sso_mini.config import ModelConfig
from sso_mini.lora import (
    LoRALinear, adapters_disabled, apply_lora, load_lora_state_dict, lora_parameters, lora_state_dict, merge_lora,
    merged_state_dict,
)
from sso_mini.memory import memory_budget
from sso_mini.model import Transformer, padding_causal_mask
from sso_mini.tokenizer import Tokenizer

V = 320
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama-bias-gqa": ModelConfig(**SMALL, num_key_value_heads=2, qkv_bias=True, o_bias=True),
    "qwen2-tied": ModelConfig(**SMALL, architecture="Qwen2ForCausalLM", num_key_value_heads=2, qkv_bias=True,
                              tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6),
}
NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_model(config, seed=0):
    """Every tensor random (norms and biases too), so each term of the forward is exercised."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def perturb_adapters(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)


@pytest.fixture(params=list(CONFIGS))
def config(request):
    return CONFIGS[request.param]


@pytest.fixture
def ids():
    torch.manual_seed(2)
    return torch.randint(0, V, (2, 24))


def tokenizer_stub(folder):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tk = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(folder / "tokenizer.json"))
    return Tokenizer.from_folder(folder)


def test_lora_linear_matches_naive_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    lin = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(5, 12)
    W = base.weight + (6.0 / 3) * lin.lora_B @ lin.lora_A  # [7, 12]
    assert torch.allclose(lin(x), x @ W.T + base.bias, atol=1e-5)
    assert torch.allclose(lin.merged_weight(), W, atol=1e-6)
    assert lin.lora_A.shape == (3, 12) and lin.lora_B.shape == (7, 3) and lin.lora_A.abs().sum() > 0


def test_adapters_start_at_zero_and_keys_are_kept(config, ids):
    model = random_model(config)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, rank=4, alpha=8)
        after = model(ids)
    assert torch.equal(before, after)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 7 * config.num_hidden_layers
    lora_keys = [k for k in model.state_dict() if k not in keys]
    assert [k for k in model.state_dict() if k in keys] == keys  # base keys unchanged, in order
    assert sorted(lora_keys) == sorted(f"{n}.{p}" for n in wrapped for p in ("lora_A", "lora_B"))


def test_only_adapters_get_gradients_and_change(config, ids):
    model = apply_lora(random_model(config), rank=4, alpha=8).train()
    perturb_adapters(model)
    base = {k: v.clone() for k, v in merged_state_dict(model).items()}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    model(ids).logsumexp(-1).mean().backward()
    trainable = {id(p) for p in lora_parameters(model)}
    assert len(trainable) == 2 * 7 * config.num_hidden_layers
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            assert p.dtype == torch.float32
        else:
            assert not p.requires_grad and p.grad is None, name
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    opt.step()
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert torch.equal(p, frozen_before[name]), name
    assert any(not torch.equal(merged_state_dict(model)[k], base[k]) for k in base)  # the step did something


def test_merged_model_and_saved_folder_equal_adapted(config, ids, tmp_path):
    model = apply_lora(random_model(config), rank=4, alpha=8)
    perturb_adapters(model)
    with torch.no_grad():
        adapted = model(ids)
        with adapters_disabled(model):
            base = model(ids)
    assert (adapted - base).abs().max() > 0.1  # the adapters matter, so the comparisons below mean something
    # independent merge: W + alpha/r * B @ A written out here
    naive = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            naive[name + ".weight"] = m.weight + 2.0 * m.lora_B @ m.lora_A
            del naive[name + ".lora_A"], naive[name + ".lora_B"]
    merged_sd = merged_state_dict(model)
    assert list(merged_sd) == list(naive)
    for k in naive:
        assert torch.allclose(merged_sd[k], naive[k], atol=1e-6), k

    merged = merge_lora(model)
    assert type(merged) is Transformer and not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        assert (merged(ids) - adapted).abs().max() <= 1e-5
    out = tmp_path / "merged"
    save_model(merged, tokenizer_stub(tmp_path), out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, _ = load_model(out)
    with torch.no_grad():
        assert (hf(ids).logits - adapted).abs().max() <= 1e-5
        assert (ours(ids) - adapted).abs().max() <= 1e-5


def test_disabled_adapters_give_the_base_model(config, ids):
    model = random_model(config)
    with torch.no_grad():
        reference = model(ids)
    apply_lora(model, rank=4, alpha=8)
    perturb_adapters(model)
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(model(ids), reference)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(model):
        raise RuntimeError("boom")
    with torch.no_grad():
        assert not torch.equal(model(ids), reference)  # adapters back on after the block, even on error


def test_adapter_state_dict_round_trip(config, ids, tmp_path):
    model = apply_lora(random_model(config), rank=4, alpha=8)
    perturb_adapters(model)
    save_file(lora_state_dict(model), str(tmp_path / "adapters.safetensors"))
    fresh = apply_lora(random_model(config), rank=4, alpha=8)  # same base, new random A, zero B
    with torch.no_grad():
        assert not torch.equal(fresh(ids), model(ids))
        load_lora_state_dict(fresh, load_file(str(tmp_path / "adapters.safetensors")))
        assert torch.equal(fresh(ids), model(ids))
    assert all(".lora_" in k for k in lora_state_dict(model))
    other_rank = apply_lora(random_model(config), rank=2, alpha=8)
    with pytest.raises(ValueError, match=r"has shape .*\(different rank\?\)"):
        load_lora_state_dict(other_rank, lora_state_dict(model))
    partial = {k: v for k, v in lora_state_dict(model).items() if "q_proj" not in k}
    with pytest.raises(ValueError, match="missing .*q_proj"):
        load_lora_state_dict(fresh, partial)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_lora_state_dict(random_model(config), lora_state_dict(model))


def test_bad_arguments_are_refused():
    model = random_model(CONFIGS["qwen2-tied"])
    with pytest.raises(ValueError, match="unknown LoRA target.*'qkv'.*valid names are q_proj, k_proj"):
        apply_lora(model, targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, rank=0)
    apply_lora(model, targets=("q_proj", "v_proj"))
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)} == {"q_proj",
                                                                                                    "v_proj"}
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


def test_dropout_only_in_train_mode(ids):
    model = apply_lora(random_model(CONFIGS["llama-bias-gqa"]), rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        model.train()
        base = merge_lora(model)(ids)
        assert torch.equal(model(ids), base)  # B = 0: dropout on the adapter input cannot touch the base path
        perturb_adapters(model)
        a, b = model(ids), model(ids)
        assert not torch.equal(a, b)
        model.eval()
        c, d = model(ids), model(ids)
        assert torch.equal(c, d) and (c - merge_lora(model)(ids)).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_same_gradients(ids):
    model = apply_lora(random_model(CONFIGS["llama-bias-gqa"]), rank=4, alpha=8, dropout=0.1).train()
    perturb_adapters(model)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # same dropout masks; checkpointing must replay them in the recompute
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-6)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_kv_cache_decode_matches_full_forward(ids):
    """The sampler's path (static cache, input_pos, 4-D mask) sees the adapted weights."""
    model = apply_lora(random_model(CONFIGS["qwen2-tied"]), rank=4, alpha=8)
    perturb_adapters(model)
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(B, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # [T, S]
        prefill = torch.arange(8)
        def step(ids, positions, mask, slots):
            return model.logits(model.hidden_states(ids, positions, mask, slots))

        steps = [step(ids[:, :8], prefill.expand(B, 8), causal[None, None, :8].expand(B, 1, 8, T), prefill)]
        for t in range(8, T):
            pos = torch.tensor([t])
            steps.append(step(ids[:, t:t + 1], pos.expand(B, 1), causal[None, None, t:t + 1].expand(B, 1, 1, T), pos))
        model.clear_cache()
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_bf16_base_with_fp32_adapters(ids):
    model = random_model(CONFIGS["llama-bias-gqa"])
    with torch.no_grad():
        ref32 = model(ids)
    model.to(torch.bfloat16)
    with torch.no_grad():
        ref16 = model(ids)
    apply_lora(model, rank=4, alpha=8).train()
    assert {p.dtype for p in lora_parameters(model)} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(model(ids), ref16)
    out = model(ids)
    assert out.dtype == torch.bfloat16
    out.float().logsumexp(-1).mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in lora_parameters(model))
    perturb_adapters(model)
    merged = merged_state_dict(model)
    assert all(merged[k].dtype == torch.bfloat16 for k in merged)
    # the bf16 adapted model stays close to an fp32 computation of the same merged weights
    fp32 = Transformer(model.config)
    fp32.load_state_dict({k: v.float() for k, v in merged.items()})
    with torch.no_grad():
        exact, low = fp32(ids), model(ids).float()
    assert (low - exact).abs().max() / exact.abs().max() < 0.05
    assert (exact - ref32).abs().max() > 0.1  # and the adapters moved it


def test_memory_budget_counts(config):
    model = random_model(config)
    n = sum(p.numel() for p in model.parameters())
    full = memory_budget(config)
    assert full["weights"] + full["gradients"] + full["optimizer"] == 16 * n  # AdamW, fp32 master
    apply_lora(model, rank=8, alpha=16)
    lora = memory_budget(config, lora_rank=8)
    assert lora["trainable_params"] == sum(p.numel() for p in lora_parameters(model))
    assert lora["weights"] == 2 * n + 4 * lora["trainable_params"]
    assert lora["total"] < full["total"]


def saved_activation_bytes(config, tokens: int, lora_rank: int | None, layers: int) -> int:
    """Bytes autograd saves for the backward of a `layers`-block model of `config`'s shapes on `tokens` tokens,
    counted on the meta device (no memory, real shapes and dtypes): every saved tensor with a token dimension,
    a view and its base once, the weights never. Attention is counted as flash and flex attention save it
    (q, its output, k and v at the kv heads' width, a per-row log-sum-exp) instead of the [T, T] probabilities
    the meta device's reference kernel keeps. The meta device has no autocast: the model is bf16, as LoRA's
    frozen base is and as FSDP's mixed-precision policy computes a full fine-tune."""
    import dataclasses

    import torch.nn.functional as F

    from sso_mini import model as model_module

    with torch.device("meta"):
        m = Transformer(dataclasses.replace(config, num_hidden_layers=layers)).to(torch.bfloat16)
    if lora_rank:
        apply_lora(m, rank=lora_rank, alpha=2 * lora_rank)
    m.train()
    weights = {id(p) for p in m.parameters()}
    saved, inside = {}, [False]  # id -> tensor; inside: within attention, whose own saves are replaced below

    def pack(t):
        base = t if t._base is None else t._base  # a view shares its base's memory: counted once
        if not inside[0] and id(base) not in weights and tokens in base.shape:
            saved[id(base)] = base  # kept alive, so that an id is never reused
        return t

    real = F.scaled_dot_product_attention

    def flash_like(q, k, v, attn_mask=None, is_causal=False):
        inside[0] = True
        out = real(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        inside[0] = False
        kv_heads = config.num_key_value_heads  # the model repeats k and v per query head; flex reads them once
        for t in (q, out, k.new_empty(k.size(0), kv_heads, *k.shape[2:]), v.new_empty(v.size(0), kv_heads,
                                                                                        *v.shape[2:]),
                  out.new_empty(out.shape[:-1], dtype=torch.float32)):  # ..., the log-sum-exp [B, H, T]
            pack(t)
        return out

    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    position = torch.arange(tokens, device="meta")[None]
    mp = pytest.MonkeyPatch()
    mp.setattr(model_module.F, "scaled_dot_product_attention", flash_like)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m.hidden_states(ids, position, padding_causal_mask(torch.ones(1, tokens, dtype=torch.long, device="meta")))
    finally:
        mp.undo()
    return sum(t.numel() * t.element_size() for t in saved.values())


@pytest.mark.parametrize("lora_rank", [16, None], ids=["LoRA r=16", "full fine-tune"])
def test_memory_model_agrees_with_a_count_of_saved_tensors_on_the_meta_device(lora_rank):
    from sso_mini.memory import PRESETS
    from sso_mini.memory import activation_bytes_per_token

    config, T = PRESETS["Qwen2-7B"], 256
    # one block in steady state: two blocks minus one (the embedding, the final norm and block 0's input,
    # which under LoRA needs no gradient, cancel)
    counted = (saved_activation_bytes(config, T, lora_rank, 2) - saved_activation_bytes(config, T, lora_rank, 1)) / T
    modelled = activation_bytes_per_token(config, checkpointing=False, full=lora_rank is None)
    modelled /= config.num_hidden_layers
    assert abs(modelled - counted) / counted < 0.10, (modelled, counted)
    assert 190 * 1024 < counted < 260 * 1024  # ~200 KiB per token per layer: the MLP's four [T, 18944] tensors


def test_the_default_token_budget_for_qwen2_7b_fits_an_80_gb_gpu():
    from sso_mini.memory import PRESETS
    from sso_mini.memory import GPU_MEMORY_SHARE, micro_batch_tokens

    config, free = PRESETS["Qwen2-7B"], 79 * 2**30  # what an 80 GB H100 reports free before anything is loaded
    for rank, n_ranks in ((16, 1), (None, 8)):  # LoRA on one GPU; a full fine-tune across 8 ranks
        tokens, checkpointing = micro_batch_tokens(config, free, rank, n_ranks, record=6 * 2048)
        budget = memory_budget(config, lora_rank=rank, tokens=tokens, checkpointing=checkpointing, n_ranks=n_ranks)
        assert budget["total"] <= GPU_MEMORY_SHARE * free and tokens >= 6 * 2048, (rank, tokens, budget)
        assert checkpointing  # without it a 12k-token record alone needs ~66 GiB of activations
        # the old default (16k tokens, no checkpointing) would not have fit
        assert memory_budget(config, lora_rank=rank, tokens=16384, checkpointing=False, n_ranks=n_ranks)["total"] > free
    with pytest.raises(ValueError, match="GiB free"):
        micro_batch_tokens(config, 16 * 2**30, None, 1)  # a full fine-tune on one 16 GB GPU


@pytest.mark.parametrize("flags, checkpointing", [([], True), (["--no-g"], False), (["--recipe", "v2"], False)])
def test_the_gpu_plan_holds_the_sequences_its_loss_reads(tmp_path, monkeypatch, flags, checkpointing):
    """On an 80 GB GPU, Qwen2-7B with LoRA: v1's record is 6 sequences of --cutoff 2048 (12,288 tokens), which needs
    checkpointing; w/o G reads 2 and v2 at most 4 (8,192 tokens), which fit without recomputing the activations."""
    import json

    from sso_mini import memory
    from sso_mini.memory import PRESETS
    from sso_mini.settings import build_parser, machine_defaults

    (tmp_path / "config.json").write_text(json.dumps(PRESETS["Qwen2-7B"].to_hf_dict()))
    monkeypatch.setattr(memory, "plan_bytes", lambda device: 79 * 2**30)
    args = build_parser().parse_args(["--model", str(tmp_path), *flags])
    args.device = "cuda"  # (parse_args would refuse it on this machine; the plan reads only the device's type)
    planned, memory_plan = machine_defaults(args)
    assert planned["lora"] and planned["gradient_checkpointing"] == checkpointing
    sequences = 6 if checkpointing else 4
    assert planned["tokens_per_micro_batch"] >= sequences * 2048


def test_each_iteration_plans_from_its_longest_record(tmp_path, monkeypatch, smollm2):
    """--cutoff 2048 bounds a v1 record at 12,288 tokens, which on an 80 GB GPU needs checkpointing for Qwen2-7B with
    LoRA; the records actually sampled are shorter (here about 4,000 tokens: three prompts, six responses), so the
    iteration plans from the longest of them and trains without checkpointing. A --gradient-checkpointing given
    on the command line stays."""
    import json

    from sso_mini import memory
    from sso_mini.memory import PRESETS, micro_batch_tokens, planned_config
    from sso_mini.settings import build_parser, machine_defaults, stage_configs
    from sso_mini.tokenizer import prompt_ids

    _, tok = smollm2
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["Qwen2-7B"].to_hf_dict()))
    monkeypatch.setattr(memory, "plan_bytes", lambda device: 79 * 2**30)
    words = "the river carried small stones past the mill and on towards the sea".split()
    records = [{"prompt": f"Question {i}: why do rivers bend?", "p_system": "Answer briefly.", "n_system": "Ramble.",
                "chosen": " ".join(words * (20 + 20 * i)), "rejected": " ".join(words * 30),
                "raw": " ".join(words * 25), "capped": {}} for i in range(3)]

    def packed_tokens(r):  # each pair's prompt once, then its two responses (+ the end-of-turn token each)
        y = {k: len(tok.encode(r[k])) + 1 for k in ("chosen", "rejected", "raw")}
        x = [len(prompt_ids(tok, s, r["prompt"])) for s in ("", r["p_system"], r["n_system"])]
        return x[0] + x[1] + x[2] + 3 * y["chosen"] + 2 * y["rejected"] + y["raw"]

    longest = max(map(packed_tokens, records))
    assert 3000 < longest < 6 * 2048
    for given in ([], ["--gradient-checkpointing"]):
        args = build_parser().parse_args(["--model", str(tmp_path), *given])
        args.device = "cuda"  # (parse_args would refuse it on this machine; the plan reads only the device's type)
        defaults, memory_plan = machine_defaults(args)
        flags = argparse.Namespace(**{**vars(args), **defaults, "loss": "ipo"})
        settled = stage_configs(flags)["policy"]
        assert settled.gradient_checkpointing  # the bound needs it
        cfg = planned_config(settled, memory_plan, records, tok)
        expected = micro_batch_tokens(PRESETS["Qwen2-7B"], 79 * 2**30, 16, 1, record=longest)
        assert expected[1] is False and expected[0] >= longest
        assert cfg.tokens_per_micro_batch == expected[0]
        assert cfg.gradient_checkpointing == bool(given)
