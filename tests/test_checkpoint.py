"""The real SmolLM2: conversion, logits and a greedy reply against transformers; bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from sso_mini import checkpoint
from sso_mini.checkpoint import CheckpointError, fetch_default_model, load_model, resolve, save_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_converted_tensors_equal_transformers_gguf_dequantization(hf_smollm2):
    hf, _ = hf_smollm2
    ref = hf.state_dict()
    folder = fetch_default_model()
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert len(keys) == 272  # 30 x 9 per block + embedding + final norm; tied head
        for key in keys:
            assert torch.equal(f.get_tensor(key), ref[key]), key


def test_chat_logits_match_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok.encode_chat(QUESTION)])
    with torch.no_grad():
        ours, ref = model(ids), hf_smollm2[0](ids).logits
    assert ids.shape[1] == 37
    assert (ours - ref).abs().max() <= 1e-4
    assert ours[0, -1].topk(5).indices.tolist() == [504, 60, 15319, 2219, 7026]  # "The", "L", "La", "Al", "Le"


def test_greedy_reply_is_the_same_text(smollm2, hf_smollm2):
    model, tok = smollm2
    hf, _ = hf_smollm2
    prompt = torch.tensor([tok.encode_chat(QUESTION)])
    ids = prompt
    with torch.no_grad():
        for _ in range(20):  # full recompute each step: independent of the sampler's KV cache
            nxt = model(ids)[0, -1].argmax()
            if nxt.item() in tok.stop_ids:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=2)
    ours_text = tok.decode(ids[0, prompt.shape[1]:].tolist())
    ref_text = tok.decode([t for t in ref[0, prompt.shape[1]:].tolist() if t != 2])
    assert ours_text == ref_text == "The capital of France is Paris."


def test_real_model_round_trip_through_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    save_model(model, tok, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode_chat(QUESTION)])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4
    again, tok2 = load_model(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert tok2.apply_chat_template(QUESTION) == tok.apply_chat_template(QUESTION)


# --- bad input: one clear line, non-zero exit, nothing half-written --------------------


def run_cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})}
    return subprocess.run([sys.executable, "-m", "sso_mini.find_model", *args], capture_output=True, text=True, env=env)


def tiny_folder(tmp_path):
    from sso_mini.config import ModelConfig
    from sso_mini.model import Transformer

    _, tok = load_model("SmolLM2-135M-Instruct")
    cfg = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    save_model(Transformer(cfg), tok, tmp_path / "tiny")
    return tmp_path / "tiny"


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_missing_folder(tmp_path):
    assert_one_line_error(run_cli(str(tmp_path / "nope")), "no such model folder")


def test_cli_unknown_name():
    assert_one_line_error(run_cli("GPT-5"), "unknown model name 'GPT-5'")


def test_cli_known_name_absent_says_where_to_put_it(tmp_path):
    env_before = os.environ.get("SSO_MINI_MODELS")
    os.environ["SSO_MINI_MODELS"] = str(tmp_path)
    try:
        assert_one_line_error(run_cli("Qwen2-7B"), str(tmp_path / "Qwen2-7B"), "put its Hugging Face folder")
    finally:
        os.environ.pop("SSO_MINI_MODELS") if env_before is None else os.environ.update(SSO_MINI_MODELS=env_before)


def test_cli_unsupported_architecture(tmp_path):
    folder = tiny_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    assert_one_line_error(run_cli(str(folder)), "unsupported architecture 'GPT2LMHeadModel'")


def test_cli_shape_mismatch(tmp_path):
    folder = tiny_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    assert_one_line_error(run_cli(str(folder)), "gate_proj.weight has shape (64, 32)", "(96, 32)")


def test_cli_missing_shard(tmp_path):
    folder = tiny_folder(tmp_path)
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(run_cli(str(folder)), "missing shard model-00002-of-00002.safetensors")
    save_file({k: state[k] for k in keys[half:]}, folder / "model-00002-of-00002.safetensors")
    assert run_cli(str(folder)).returncode == 0  # complete shards load


def test_failed_save_leaves_nothing_behind(smollm2, tmp_path, monkeypatch):
    model, tok = smollm2

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError):
        save_model(model, tok, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_folder(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path)
    before = (folder / "model.safetensors").read_bytes()
    model, tok = load_model(folder)
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_model(model, tok, folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_resolve_errors_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                                           "hidden_size": 8, "intermediate_size": 8,
                                                           "num_hidden_layers": 1, "num_attention_heads": 2}))
        load_model(tmp_path)
    shutil.rmtree(tmp_path)


def test_a_config_without_a_required_key_is_named(tmp_path):
    config = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 8, "intermediate_size": 8, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing hidden_size, num_attention_heads$"):
        load_model(tmp_path)


def hub_layout(hub, repo_id, model_dir, revision="0123abcd", ref=True):
    """A Hugging Face cache entry laid out by hand: blobs, symlinked snapshot files, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy2(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_hub_id_or_bare_name_finds_the_hugging_face_cache(tiny_model_dir, tmp_path, monkeypatch, variable):
    hub = tmp_path / "hf" / ("hub" if variable == "HF_HOME" else "")
    monkeypatch.setenv(variable, str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE" if variable == "HF_HOME" else "HF_HOME", raising=False)
    monkeypatch.setenv("SSO_MINI_MODELS", str(tmp_path / "models"))  # empty: the cache must be found
    old = hub_layout(hub, "Org/Tiny-Model", tiny_model_dir, revision="old", ref=False)
    snapshot = hub_layout(hub, "Org/Tiny-Model-2", tiny_model_dir)
    assert resolve("Org/Tiny-Model-2") == snapshot and resolve("Tiny-Model-2") == snapshot
    assert resolve("Org/Tiny-Model") == old  # no refs/main: the newest snapshot
    model, _ = load_model("Org/Tiny-Model-2")  # through the symlinks, like a real cache
    expected, _ = load_model(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_a_missing_hub_model_names_every_place_looked_in(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SSO_MINI_MODELS", str(tmp_path / "models"))
    with pytest.raises(CheckpointError) as e:
        resolve("Qwen/Qwen2-7B")
    message = str(e.value)
    assert str(tmp_path / "models" / "Qwen2-7B") in message
    assert str(tmp_path / "hub" / "models--Qwen--Qwen2-7B") in message
    assert_one_line_error(run_cli("Qwen/Qwen2-7B", env={"HF_HUB_CACHE": str(tmp_path / "hub"),
                                                         "SSO_MINI_MODELS": str(tmp_path / "models")}),
                          "model 'Qwen/Qwen2-7B' not found (looked in")
