"""What sso-mini never does with the files it reads: unpickle them, run a model folder's code,
or let a chat template reach Python's internals."""

import json
import pickle
import shutil

import pytest
import torch

import train
from sso_mini.checkpoint import load_model
from sso_mini.tokenizer import Tokenizer


def refuse(*a, **k):
    raise AssertionError("something tried to unpickle a file")


def test_a_run_and_its_resume_load_nothing_pickled(tiny_model_dir, tmp_path, monkeypatch):
    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    (tmp_path / "prompts.txt").write_text("Name a fruit.\nSay hello.\nCount to three.\nName a color.\n")
    argv = ["--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "run"),
            "--max-new-tokens", "4", "--batch-size", "1", "--eval-prompts", "1", "--save-every", "1", "--no-progress"]
    real = train.train_epoch

    def stopped_at_step_2(*a, **k):
        k["on_step"] = lambda step: step == 2 and (_ for _ in ()).throw(RuntimeError("stopped"))
        return real(*a, **k)

    monkeypatch.setattr(train, "train_epoch", stopped_at_step_2)
    with pytest.raises(RuntimeError, match="stopped"):
        train.main(argv)
    assert (tmp_path / "run" / "iter_0" / "resume" / "state.json").exists()
    monkeypatch.setattr(train, "train_epoch", real)
    train.main([*argv, "--resume"])  # reads the resume state, the reference cache, the pairs: no pickle
    assert (tmp_path / "run" / "final" / "summary.json").exists()


def test_a_model_folders_code_is_never_run(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model(folder)
    assert model.config.num_hidden_layers == 2 and not marker.exists()


def test_a_chat_template_cannot_reach_python_internals(tiny_model_dir, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "tokenizer.json", folder / "tokenizer.json")
    template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    tok = Tokenizer.from_folder(folder)
    with pytest.raises(ValueError, match="the chat template tried something the sandbox refuses"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
