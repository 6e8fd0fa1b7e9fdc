"""The harness runs train.py as a program, the way a user does, and reads the run folders it writes.

`train` runs `python train.py FLAGS` (its progress and messages pass through); `seed_run` starts a run
folder that `train.py --resume` continues, with iteration 0's files copied in, so that several runs can
share data sampled once (the ablation's variants, the learning curve's grid points).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..assets import write_json
from ..settings import OPERATIONAL, parse_args, settle

TRAIN = Path(__file__).resolve().parents[2] / "train.py"


def train(argv: list[str]):
    """`python train.py argv`; RuntimeError (with its exit code) if it fails, after it said why."""
    done = subprocess.run([sys.executable, str(TRAIN), *map(str, argv)])
    if done.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(map(str, argv))} failed (exit {done.returncode})")


def recorded_settings(argv: list[str]) -> dict:
    """The run.json that `train.py argv` writes: every flag that defines the run, its default resolved."""
    s = settle(parse_args(list(map(str, argv))))
    return {k: v for k, v in vars(s.flags).items() if k not in OPERATIONAL}


def seed_run(run: Path, settings: dict, fill_first_iteration):
    """Start a run folder that train.py --resume continues: run.json holds `settings` and
    fill_first_iteration(folder) writes iter_0's files into `folder`. The run appears whole or not at all."""
    tmp = run.with_name(run.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "iter_0").mkdir(parents=True)
    fill_first_iteration(tmp / "iter_0")
    write_json(tmp / "run.json", settings)
    shutil.rmtree(run, ignore_errors=True)
    os.replace(tmp, run)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
