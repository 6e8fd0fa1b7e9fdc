"""Bad input to train.py: one `error:` line, exit code 2, nothing written, before any model loads."""

import json

import pytest
import torch

import train

PROMPTS = ["Name a fruit.", "Say hello.", "Count to three.", "Name a color."]


@pytest.fixture
def inputs(tmp_path, tiny_model_dir):
    """A prompt file, the tiny model folder, and files that are wrong in one way each."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    feature = ('[[feature]]\nname = "Short"\ngood_adjective = "Short"\nbad_adjective = "Long"\nmeaning = "m"\n'
               'good_principle = "Be short."\nbad_principle = "Be long."\n')
    (tmp_path / "no_field.toml").write_text(feature.replace('meaning = "m"\n', ""))
    (tmp_path / "bad_rule.toml").write_text(feature + 'check = [{rule = "shortish"}]\n')
    (tmp_path / "bad_kwargs.toml").write_text(feature + 'check = [{rule = "length_constraints:number_words", '
                                                        'relation = "about", num_words = 5}]\n')
    (tmp_path / "k2.toml").write_text("features_per_prompt = 2\n" + feature)
    (tmp_path / "empty.toml").write_text("# nothing here\n")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    return tmp_path, tiny_model_dir


NO_CUDA = "cuda" if not torch.cuda.is_available() else "cuda:99"  # a device this machine lacks, either way
CASES = [  # (flags, what the error line must say)
    (["--lr", "-1"], "--lr -1.0 is out of range (allowed: >= 0"),
    (["--lr", "nan"], "--lr nan is out of range"),
    (["--batch-size", "0"], "--batch-size 0 is out of range (allowed: >= 1)"),
    (["--batch-size", "2", "--micro-batch-size", "3"],
     "--micro-batch-size 3 is out of range (allowed: 1 to --batch-size)"),
    (["--alpha", "2"], "--alpha 2.0 is out of range (allowed: 0 to 1)"),
    (["--verifier-share", "2"], "--verifier-share 2.0 is out of range (allowed: 0 to 1)"),
    (["--theta", "-1"], "--theta -1.0 is out of range (allowed: >= 0)"),
    (["--beta", "0"], "--beta 0.0 is out of range (allowed: > 0)"),
    (["--iterations", "0"], "--iterations 0 is out of range (allowed: >= 1)"),
    (["--prompts-per-iteration", "0"], "--prompts-per-iteration 0 is out of range"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 is out of range (allowed: >= 1)"),
    (["--sample-batch-size", "0"], "--sample-batch-size 0 is out of range"),
    (["--cutoff", "1"], "--cutoff 1 is out of range (allowed: >= 2 tokens)"),
    (["--cutoff", "40"], "--cutoff 40 cannot hold the longest prompt ("),
    (["--eval-prompts", "-1"], "--eval-prompts -1 is out of range (allowed: >= 0"),
    (["--save-every", "0"], "--save-every 0 is out of range"),
    (["--lora-rank", "0"], "--lora-rank 0 is out of range"),
    (["--lora-dropout", "1"], "--lora-dropout 1.0 is out of range (allowed: 0 to below 1)"),
    (["--device", NO_CUDA], f"--device {NO_CUDA}:"),
    (["--device", "tpu"], "--device 'tpu' is not a device (allowed: cpu, cuda, cuda:N)"),
    (["--form", "v3"], "unknown --form 'v3' (choose from v1, w_on_g)"),
    (["--form", "generator"], "unknown --form 'generator' (choose from v1, w_on_g)"),  # --recipe v2 trains it
    (["--recipe", "v3"], "argument --recipe: invalid choice: 'v3'"),
    (["--generator-terms", "pos,base"], "--generator-terms 'pos,base': give pos, neg or pos,neg"),
    (["--recipe", "v2", "--pairs", "{tmp}/pairs.jsonl"], "--recipe v2 samples the policy's pairs with its generator"),
    (["--loss", "kto"], "unknown --loss 'kto' (choose from ipo, dpo)"),
    (["--lora-targets", "q_proj,qkv"], "unknown --lora-targets qkv"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--eval-prompts", "4"], "--eval-prompts 4 leaves none of the 4 prompts to train on (allowed: 0 to 3)"),
    (["--prompts", "{tmp}/missing.txt"], "missing.txt: no such prompt file"),
    (["--prompts", "{tmp}/empty.txt"], "empty.txt: no prompts"),
    (["--prompts", "{tmp}/broken.jsonl"], "broken.jsonl:2: not valid JSON"),
    (["--pairs", "{tmp}/pairs.jsonl"],
     "pairs.jsonl:1: missing or non-string field(s) p_system, n_system, rejected, raw"),
    (["--principles", "{tmp}/no_field.toml"], "no_field.toml: feature 'Short': field 'meaning' is missing or empty"),
    (["--principles", "{tmp}/bad_rule.toml"], "bad_rule.toml: feature 'Short': field 'check': unknown rule 'shortish'"),
    (["--principles", "{tmp}/bad_kwargs.toml"],
     "bad_kwargs.toml: feature 'Short': field 'check': rule 'length_constraints:number_words': bad arguments"),
    (["--principles", "{tmp}/k2.toml"], "k2.toml: features_per_prompt 2 is out of range (allowed: 1 to 1"),
    (["--principles", "{tmp}/empty.toml"], "empty.toml: no features"),
    (["--principles", "shakespeare"], "--principles shakespeare: no such file or set (sets: "),
    (["--model", "{tmp}/no-such-model"], "no-such-model: no such model folder"),
    (["--model", "{tmp}/gpt2"], "unsupported architecture 'GPT2LMHeadModel'"),
]


@pytest.mark.parametrize("flags,message", CASES, ids=[" ".join(f[-2:]).replace("{tmp}/", "") for f, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(inputs, flags, message, capsys, monkeypatch):
    tmp, model = inputs
    loaded = []
    monkeypatch.setattr(train, "load_model", lambda *a, **k: loaded.append(a))  # must never be reached
    out = tmp / "run"
    argv = ["--model", str(model), "--prompts", str(tmp / "prompts.txt"), "--out", str(out), "--eval-prompts", "1",
            "--no-progress",
            *[f.format(tmp=tmp) for f in flags]]
    code = train.cli(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists() and not loaded


def test_a_failed_start_leaves_no_run_behind(inputs, capsys):
    """The corrected retry of a failed start, with the same --out, just runs."""
    tmp, model = inputs
    out = tmp / "run"
    common = ["--model", str(model), "--out", str(out), "--max-new-tokens", "4", "--batch-size", "2",
              "--eval-prompts", "0", "--iterations", "1", "--no-progress"]
    assert train.cli([*common, "--prompts", str(tmp / "missing.txt")]) == 2
    assert not out.exists()
    assert train.cli([*common, "--prompts", str(tmp / "prompts.txt")]) == 0
    assert (out / "iter_0" / "model" / "model.safetensors").exists()
    capsys.readouterr()
    assert train.cli([*common, "--prompts", str(tmp / "prompts.txt")]) == 2  # a finished run is not overwritten
    assert "already holds a run: pass --resume" in capsys.readouterr().err


def test_a_start_that_fails_reading_the_weights_can_be_retried_as_is(inputs, tmp_path, capsys):
    """run.json is written before the weights are read; until a stage writes output the run has not started."""
    import shutil

    tmp, model = inputs
    broken = tmp_path / "broken-model"
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:1000])  # cut short
    out = tmp / "run"
    common = ["--out", str(out), "--prompts", str(tmp / "prompts.txt"), "--max-new-tokens", "4", "--batch-size", "2",
              "--eval-prompts", "0", "--iterations", "1", "--no-progress"]
    assert train.cli(["--model", str(broken), *common]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {broken}: unreadable weights (")  # one line, no traceback
    assert (out / "run.json").exists() and not any(out.glob("iter_0/*"))  # nothing of the run was written
    shutil.rmtree(broken)
    shutil.copytree(model, broken)  # the user repairs the folder and runs the same command again
    assert train.cli(["--model", str(broken), *common]) == 0, capsys.readouterr().err
    assert (out / "iter_0" / "model" / "model.safetensors").exists()


def test_an_asset_missing_offline_is_one_error_line(inputs, tmp_path):
    """No network and an empty cache: the IFEval checkers the default principle set's checks need cannot be
    fetched (punkt, the checkers); train.py says so in one line, says how to fill the cache, and writes nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tmp, model = inputs
    root = Path(__file__).resolve().parents[1]
    offline = {**os.environ, "PYTHONPATH": str(root), "SSO_MINI_CACHE": str(tmp_path / "empty-cache"),
               "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
               "PIP_RETRIES": "0", "PIP_TIMEOUT": "1"}  # a registry nobody answers, and no local wheels
    out = tmp / "run"
    done = subprocess.run([sys.executable, str(root / "train.py"), "--model", str(model), "--prompts",
                           str(tmp / "prompts.txt"), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=offline, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: could not download ") and "from PyPI" in lines[0] and "--fetch-only" in lines[0]
    assert not out.exists()
