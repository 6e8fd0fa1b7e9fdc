"""Tokenizer ids and chat template against transformers' tokenizer for the same GGUF."""

import pytest
from tokenizers import pre_tokenizers

STRINGS = [
    "Hello", "Hello world", "  leading spaces", "trailing spaces   ", "a\nb\n\nc\r\n", "\t\ttabs\tinside",
    "x  5", "The year 2024 had 366 days.", "3.14159 and 1,000,000", "phone: +1 (555) 010-9999",
    "日本語のテキスト", "中文测试，标点！", "emoji 😀🎉 and 👍🏽", "def f(x):\n    return x ** 2  # square",
    "for (int i = 0; i < 10; i++) { sum += i; }", "<|im_start|>user\nhi<|im_end|>\n", "naïve café résumé",
    "MiXeD CaSe and UPPER", "URL https://example.com/a?b=1&c=2", "   ", "", "'quotes' \"double\" `back`",
    "multiple\n\n\n\nnewlines", "ünïcödé ☃ ∑ ∫ √", "<|endoftext|>",
]


@pytest.fixture(scope="module")
def hf_smollm_tokenizer(hf_smollm2):
    """transformers' GGUF tokenizer with llama.cpp's "smollm" pre-tokenizer put back.

    transformers drops the digit-splitting step of the smollm pre-tokenizer (docs/data.md);
    the vocabulary, merges and special tokens it builds from the GGUF are independent of ours.
    """
    _, tok = hf_smollm2
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return tok


def test_ids_equal_transformers(smollm2, hf_smollm_tokenizer):
    _, tok = smollm2
    assert len(STRINGS) >= 20
    for s in STRINGS:
        ids = tok.encode(s)
        assert ids == hf_smollm_tokenizer.encode(s, add_special_tokens=False), s
        assert tok.decode(ids, skip_special_tokens=False) == s


def test_digits_are_split_individually(smollm2):
    _, tok = smollm2
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


CONVERSATIONS = {
    "user-only": [{"role": "user", "content": "What is 2+2?"}],
    "system+user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
    "empty-system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Bye"}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_equals_apply_chat_template(smollm2, hf_smollm2, name, generation_prompt):
    _, tok = smollm2
    _, hf_tok = hf_smollm2
    messages = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    ref = hf_tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") == generation_prompt


def test_default_system_prompt_only_without_a_system_message(smollm2):
    _, tok = smollm2
    assert "named SmolLM" in tok.apply_chat_template(CONVERSATIONS["user-only"])
    assert "named SmolLM" not in tok.apply_chat_template(CONVERSATIONS["empty-system"])


def test_stop_ids(smollm2):
    _, tok = smollm2
    assert 2 in tok.stop_ids  # <|im_end|>, the real end of turn
    assert 1 not in tok.stop_ids  # <|im_start|>, which transformers' GGUF tokenizer reports as eos
