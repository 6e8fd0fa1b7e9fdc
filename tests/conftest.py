"""Shared fixtures: the real SmolLM2 (ours and transformers'), loaded once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads spin by default; on a shared 2-core runner that spinning steals the
# cores from the threads doing work (about 3x slower notebooks when measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2():
    """Our model and tokenizer for the real SmolLM2-135M-Instruct (fp32, eval mode)."""
    from sso_mini.checkpoint import load_model

    return load_model("SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own GGUF conversion of the same file: an independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sso_mini.checkpoint import default_gguf

    gguf = default_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A small random-weight Llama with SmolLM2's real tokenizer and template, saved as a HF folder.

    The loop tests need a model that samples and trains in seconds; numerics are tested elsewhere.
    """
    from sso_mini.checkpoint import save_model
    from sso_mini.config import ModelConfig
    from sso_mini.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                      rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.fill_(1.0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, smollm2[1], folder)
    return folder


@pytest.fixture
def tiny_transformer():
    """A factory of 2-layer random-weight models (vocabulary 97, GQA, tied head) in eval mode."""
    from sso_mini.config import ModelConfig
    from sso_mini.model import Transformer

    def build(seed=0, std=0.1):
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
        model = Transformer(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std) if p.dim() > 1 else p.fill_(1.0)
        return model.eval()

    return build


CHECKED_SET = """
[[feature]]
name = "Short"
good_adjective = "Short"
bad_adjective = "Long"
meaning = "Few words."
good_principle = "Use two words at most."
bad_principle = "Use many words."
check = [{rule = "length_constraints:number_words", relation = "less than", num_words = 3}]

[[feature]]
name = "Ends"
good_adjective = "Finished"
bad_adjective = "Endless"
meaning = "Stops."
good_principle = "Stop early."
bad_principle = "Never stop."
check = [{rule = "ended"}]
"""


@pytest.fixture
def checked_set(tmp_path):
    """A principle set file of two features that every prompt gets, each with a rule check: an IFEval checker
    (Short: fewer than 3 words) and our own (Ends: the answer ended before the cap)."""
    path = tmp_path / "tiny.toml"
    path.write_text(CHECKED_SET)
    return path
