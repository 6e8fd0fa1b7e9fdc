"""ModelConfig: the few numbers that define a Llama-3.x or Qwen2/2.5 decoder.

Read straight from a Hugging Face `config.json`, so any folder users already have
works. The two families differ only in small switches (q/k/v bias, tied head, rope
scaling), so one dataclass covers both; anything else is refused by name rather than
loaded wrong.
"""

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# config.json keys taken as they are: required ones, and optional ones with their defaults when absent
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_KEYS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "bos_token_id": None, "eos_token_id": None,
                 "pad_token_id": None}


@dataclass
class ModelConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama when attention_bias
    o_bias: bool = False  # Llama attention_bias also puts a bias on o_proj
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (used for memory budgets and MFU)."""
        H, I, L, D = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.head_dim
        q, kv = self.num_attention_heads * D, self.num_key_value_heads * D
        attn = H * q + 2 * H * kv + q * H + (q + 2 * kv if self.qkv_bias else 0) + (H if self.o_bias else 0)
        per_layer = attn + 3 * H * I + 2 * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        return self.vocab_size * H + L * per_layer + H + head

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{source}: unsupported architecture {arch!r} "
                             f"(sso-mini supports {', '.join(SUPPORTED_ARCHITECTURES)})")
        qwen, bias = arch == "Qwen2ForCausalLM", bool(d.get("attention_bias", False))
        if d.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        if qwen and d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        scaling = d.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise ValueError(f"{source}: unsupported rope_scaling type {kind!r} (only 'llama3')")
            scaling = {**scaling, "rope_type": "llama3"}
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}")
        heads = d["num_attention_heads"]
        return cls(architecture=arch, **{k: d[k] for k in REQUIRED_KEYS},
                   **{k: d.get(k, default) for k, default in OPTIONAL_KEYS.items()},
                   num_key_value_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                   rope_theta=float(d.get("rope_theta", 10000.0)), rope_scaling=scaling,
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   qkv_bias=qwen or bias, o_bias=not qwen and bias)  # Qwen2: q/k/v bias always, none on o_proj

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model folder?)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        """The config.json that transformers reads back into the same model."""
        keys = (*REQUIRED_KEYS, *OPTIONAL_KEYS, "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling",
                "tie_word_embeddings")
        d = {"architectures": [self.architecture], "model_type": self.model_type, "hidden_act": "silu",
             **{k: getattr(self, k) for k in keys}}
        if self.model_type == "llama":
            d |= {"attention_bias": self.qkv_bias, "mlp_bias": False}
        return d
