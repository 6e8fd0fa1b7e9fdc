"""A model named on the command line (`--model Qwen2-7B`, `--model Qwen/Qwen2-7B`), found on this machine; nothing
is downloaded. checkpoint.resolve comes here for any name that is neither a folder nor the default model.

    $SSO_MINI_MODELS/<Name>/              (default ~/models/<Name>/)
    the Hugging Face cache: $HF_HUB_CACHE, else $HF_HOME/hub (~/.cache/huggingface/hub),
        models--<Org>--<Name>/snapshots/<revision>/   <revision> from refs/main, else the newest snapshot

`python -m sso_mini.find_model MODEL` says where MODEL is and what shape it has.
"""

import os
import re
import sys
from pathlib import Path

from .checkpoint import DEFAULT_MODEL, CheckpointError, load_model, resolve

# Names the error message suggests; any name is looked for.
KNOWN_MODELS = (
    "Qwen2-7B", "Qwen2-7B-Instruct", "Qwen2.5-0.5B-Instruct", "Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct",
    "Llama-3.1-8B", "Llama-3.1-8B-Instruct", "Llama-3.2-1B-Instruct", "Llama-3.2-3B-Instruct",
)


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def cached_snapshot(name: str) -> tuple[Path | None, list[Path]]:
    """The Hugging Face cache's snapshot of "Org/Name" (or "Name" under any org): (the folder or None, the
    repository folders looked in)."""
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


def find_model(name: str) -> Path:
    """The folder of model `name` ("Name" or a hub id "Org/Name"); CheckpointError naming every place looked in."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith("."):
        raise CheckpointError(f"{name}: no such model folder")
    folder = Path(os.environ.get("SSO_MINI_MODELS", Path.home() / "models")) / name.split("/")[-1]
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


def main(argv=None):
    """`python -m sso_mini.find_model [MODEL]`: find (the default model: fetch) a model and print its shape."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF folder or model name")
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
