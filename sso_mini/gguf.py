"""The default model's file: a llama.cpp GGUF (SmolLM2-135M-Instruct, Q4_1) -> a Hugging Face folder.

Run once, on first use (checkpoint.fetch_default_model): every tensor is dequantized with the `gguf`
package into HF's names and layouts (llama.cpp permutes the rows of Q and K for its interleaved RoPE;
HF rotates halves), and the GGUF's byte-level BPE becomes a `tokenizers` tokenizer with its chat template.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .assets import atomic_folder
from .checkpoint import CheckpointError
from .config import ModelConfig


GGUF_NAMES = {  # llama.cpp tensor name -> HF name (per block unless noted)
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of Q/K (interleaved RoPE) to get HF's rotate-half order."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def gguf_to_state_dict(reader) -> dict[str, np.ndarray]:
    """Dequantize every tensor of a llama GGUF into HF names and layouts (float32)."""
    from gguf.quants import dequantize

    n_head = int(reader.fields["llama.attention.head_count"].contents())
    n_kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    state = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)  # GGUF dims are fastest-first: this is (out, in)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        else:  # blk.N.<name>.weight
            key = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = unpermute_qk(w, n_head)
            elif parts[2] == "attn_k":
                w = unpermute_qk(w, n_kv)
        state[key] = np.ascontiguousarray(w)
    return state


def gguf_tokenizer(reader):
    """The GGUF's byte-level BPE as a `tokenizers.Tokenizer`, faithful to llama.cpp's "smollm" pre-tokenizer."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tk = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    # smollm pre-tokenizer: every digit is its own piece, then GPT-2 byte-level splitting
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, kind in enumerate(types) if kind == 3]  # token_type 3: control tokens
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tk


def convert_gguf(gguf_path: Path, out: Path):
    """Convert a llama-architecture GGUF into a HF folder (fp32 safetensors, tokenizer, template)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    f = lambda key: reader.fields[key].contents()  # noqa: E731
    if f("general.architecture") != "llama":
        raise CheckpointError(f"{gguf_path}: unsupported GGUF architecture {f('general.architecture')!r}")
    state = gguf_to_state_dict(reader)
    tokens = f("tokenizer.ggml.tokens")
    special = {k: tokens[int(f(f"tokenizer.ggml.{k}_token_id"))] for k in ("bos", "eos", "unknown", "padding")}
    config = ModelConfig(
        vocab_size=len(tokens), hidden_size=int(f("llama.embedding_length")),
        intermediate_size=int(f("llama.feed_forward_length")), num_hidden_layers=int(f("llama.block_count")),
        num_attention_heads=int(f("llama.attention.head_count")),
        num_key_value_heads=int(f("llama.attention.head_count_kv")),
        head_dim=int(f("llama.rope.dimension_count")),
        rms_norm_eps=float(f"{f('llama.attention.layer_norm_rms_epsilon'):.6g}"),  # stored as f32(1e-5)
        rope_theta=float(f("llama.rope.freq_base")), max_position_embeddings=int(f("llama.context_length")),
        tie_word_embeddings="lm_head.weight" not in state,
        bos_token_id=int(f("tokenizer.ggml.bos_token_id")), eos_token_id=int(f("tokenizer.ggml.eos_token_id")),
        pad_token_id=int(f("tokenizer.ggml.padding_token_id")),
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(f("tokenizer.ggml.add_bos_token")),
        "bos_token": special["bos"], "eos_token": special["eos"], "unk_token": special["unknown"],
        "pad_token": special["padding"], "model_max_length": config.max_position_embeddings,
        "chat_template": f("tokenizer.chat_template"),
    }
    with atomic_folder(out) as tmp:
        save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        hf = config.to_hf_dict() | {"torch_dtype": "float32"}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
        gguf_tokenizer(reader).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
