"""Logit parity with transformers on random-weight Llama-3.1 and Qwen2 configs."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sso_mini.checkpoint import load_model, save_model
from sso_mini.config import ModelConfig

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)


def llama31(n_kv):
    # llama3 rope scaling with a tiny original context, so test positions cross every band
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=n_kv,
                                        rope_theta=500000.0, rope_scaling=scaling, rms_norm_eps=1e-5,
                                        tie_word_embeddings=False))


def qwen2(tied, n_kv):
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=n_kv,
                                        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied))


CASES = {
    "llama31-gqa": lambda: llama31(n_kv=2),
    "llama31-mha": lambda: llama31(n_kv=4),
    "qwen2-tied-gqa": lambda: qwen2(tied=True, n_kv=2),
    "qwen2-untied-mha": lambda: qwen2(tied=False, n_kv=4),
}


def randomized(hf):
    """HF initialises biases and norms to constants; randomise everything so each term is exercised."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    return hf.eval()


@pytest.fixture(params=list(CASES))
def pair(request, tmp_path):
    hf = randomized(CASES[request.param]())
    hf.save_pretrained(tmp_path)
    tokenizer_stub(tmp_path)
    model, _ = load_model(tmp_path)
    return hf, model


def tokenizer_stub(folder):
    """A minimal real tokenizer so the folder loads like a user's (the parity test is about weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(320)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(folder / "tokenizer.json"))


def test_logits_match_transformers(pair):
    hf, model = pair
    ids = torch.randint(0, 320, (2, 100))  # 100 positions > 16: past the llama3 scaling threshold
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max() <= 1e-4


def test_left_padded_rows_equal_unpadded(pair):
    hf, model = pair
    torch.manual_seed(1)
    rows = [torch.randint(0, 320, (n,)) for n in (30, 17, 5)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r[None])
            assert (batched[i, T - len(r):] - alone[0]).abs().max() <= 1e-4
            ref = hf(r[None]).logits  # and each row against transformers
            assert (batched[i, T - len(r):] - ref[0]).abs().max() <= 1e-4


def test_save_model_round_trip(pair, tmp_path):
    hf, model = pair
    from sso_mini.tokenizer import Tokenizer

    out = tmp_path / "saved"
    save_model(model, Tokenizer.from_folder(tmp_path), out)
    reloaded_hf = type(hf).from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        assert (reloaded_hf(ids).logits - model(ids)).abs().max() <= 1e-5
    again, _ = load_model(out)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_bf16_forward_close_to_fp32(pair):
    _, model = pair
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids).float()
    model.float()
    assert (low - ref).abs().max() / ref.abs().max() < 0.05


def test_config_rejects_unsupported_architecture():
    with pytest.raises(ValueError, match="unsupported architecture 'MistralForCausalLM'"):
        ModelConfig.from_hf_dict({"architectures": ["MistralForCausalLM"]})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"type": "yarn"},
                                  **SMALL, "num_attention_heads": 4})


def test_parameter_count_matches_transformers():
    for make in CASES.values():
        hf = make()
        cfg = ModelConfig.from_hf_dict({**hf.config.to_dict(), "architectures": [type(hf).__name__]})
        assert cfg.num_parameters == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("shape", [(1, 576), (32, 576), (3, 7, 576)])
def test_the_fast_cpu_matmul_equals_the_formula(shape):
    """fast_cpu.onednn (the CPU fast path's matmul, oneDNN) against x @ W.T + b in float64, on 1 row, a batch
    and a [B, T, H] input seen through a non-contiguous view; model.Projection (the plain path) likewise."""
    from sso_mini.fast_cpu import onednn
    from sso_mini.model import Projection

    torch.manual_seed(0)
    W, b = torch.randn(1536, 576), torch.randn(1536)
    x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]  # strided last dim
    ref = (x.double() @ W.double().T + b.double()).float()
    layer = Projection(576, 1536)
    with torch.no_grad():
        layer.weight.copy_(W), layer.bias.copy_(b)
    with torch.inference_mode():
        for y in (onednn(x, W, b), layer(x)):
            assert y.shape == ref.shape and y.dtype == torch.float32
            assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
