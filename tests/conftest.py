"""Shared fixtures: the real SmolLM2 (ours and transformers'), loaded once per session."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
