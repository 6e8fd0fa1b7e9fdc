"""Reward models from preference pairs, and a verifier-labelled set to score them on.

The paper's third use of SSO data: train a reward model (RM) on it. An RM here is the
policy's own Transformer body plus one linear head read at the last real token:

    chat(x) + y + <end of turn> -> body -> h [B, T, H] -> h at the last real token -> head -> r [B]

trained with the Bradley-Terry loss on (chosen, rejected) pairs,

    L = -log sigmoid(r_chosen - r_rejected - margin)  [+ lm_coef * NLL(chosen response)]

(margin and LM term: options of the self-reference RM's released code, both off by default).
An RM scores a response to the plain prompt x, so each pairs.jsonl record gives its base pair
(x: y_pos > y_neg); `--sso-pairs base,p,n` adds (x+: y_pos > y_neg) and (x-: y_raw > y_pos)
with their system prompts. RMs are scored on pairs labelled by rule-based verifiers
(verified_pairs.py): no human-labelled preference set is available offline.

A saved RM: a HF causal-LM folder (the body) + `reward_head.safetensors`; config.json says "sso_mini_reward_model".
"""

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..assets import atomic_folder, write_json
from ..batches import collate, collate_groups, is_capped, response_ids, truncate
from ..checkpoint import DEFAULT_MODEL, CheckpointError, load_model, resolve, write_model
from ..logprobs import packed_logprobs
from ..metrics import wilson_interval
from ..model import Transformer, padding_causal_mask, position_ids_from_mask
from ..records import REQUIRED_FIELDS, read_jsonl
from ..tokenizer import end_of_turn_id, prompt_ids
from ..trainer import make_optimizer, optimizer_step
from . import ifeval, verified_pairs

RM_MARKER = "sso_mini_reward_model"
HEAD_FILE = "reward_head.safetensors"
SSO_PAIRS = ("base", "p", "n")


# --- the model ----------------------------------------------------------------------------


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 1/0 mask -> [B] position of each row's last real token (left or right padding)."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device)  # [T]
    return (attention_mask.long() * positions).argmax(dim=-1)  # [B] the largest real position


class RewardModel(nn.Module):
    """r(x, y): a causal-LM body and a scalar head on the hidden state of the last real token."""

    def __init__(self, body: Transformer, seed: int = 0):
        super().__init__()
        self.body = body
        w = body.embed_tokens.weight
        H = body.config.hidden_size
        self.head = nn.Linear(H, 1, device=w.device, dtype=w.dtype)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # std 1/sqrt(H+1): initial rewards of order 1 (as InstructGPT-style RMs)
            self.head.weight.copy_(torch.randn(1, H, generator=g) / math.sqrt(H + 1))
            self.head.bias.zero_()

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        """input_ids, attention_mask [B, T] -> rewards [B] (float32)."""
        h = self.body.hidden_states(input_ids, position_ids_from_mask(attention_mask),
                                    padding_causal_mask(attention_mask))  # [B, T, H]
        rows = torch.arange(h.shape[0], device=h.device)
        last = h[rows, last_token_index(attention_mask)]  # [B, H]
        return self.head(last).squeeze(-1).float()  # [B]


def bt_loss(r_chosen, r_rejected, margin=None) -> torch.Tensor:
    """Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected - margin) over pairs [P]."""
    diff = r_chosen - r_rejected - (0.0 if margin is None else margin)  # [P]
    return -F.logsigmoid(diff).mean()


def is_reward_model(path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get(RM_MARKER))


def save_reward_model(rm: RewardModel, tokenizer, path, extra: dict[str, str] | None = None):
    """The body as a HF folder, the head and the config marker (and `extra` text files), moved into place at once."""
    with atomic_folder(path) as folder:
        write_model(rm.body, tokenizer, folder)
        head = {k: v.detach().contiguous().cpu() for k, v in rm.head.state_dict().items()}
        save_file(head, str(folder / HEAD_FILE), metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, RM_MARKER: True}, indent=2))
        for name, text in (extra or {}).items():
            (folder / name).write_text(text)


def load_reward_model(path, dtype=None, device=None) -> tuple[RewardModel, object]:
    """(RewardModel, Tokenizer) from a folder written by save_reward_model, in eval mode."""
    folder = Path(path)
    if not is_reward_model(folder):
        raise CheckpointError(f"{folder}: not a reward model folder (config.json lacks \"{RM_MARKER}\": true)")
    if not (folder / HEAD_FILE).is_file():
        raise CheckpointError(f"{folder}: {HEAD_FILE} is missing")
    body, tokenizer = load_model(folder, dtype, device)
    rm = RewardModel(body)
    head = load_file(folder / HEAD_FILE)
    rm.head.load_state_dict({k: v.to(rm.head.weight) for k, v in head.items()})
    return rm.eval(), tokenizer


def init_reward_model(path_or_name, seed=0, dtype=None, device=None) -> tuple[RewardModel, object]:
    """A reward model from any model folder (a new head) or from a saved reward model (its head)."""
    if is_reward_model(resolve(path_or_name)):
        return load_reward_model(resolve(path_or_name), dtype, device)
    body, tokenizer = load_model(path_or_name, dtype, device)
    return RewardModel(body, seed).eval(), tokenizer


# --- pairs --------------------------------------------------------------------------------


def sso_rm_pairs(record: dict, which=("base",)) -> list[dict]:
    """The RM pairs of one SSO record: base (x: y_pos > y_neg), p (x+: y_pos > y_neg), n (x-: y_raw > y_pos)."""
    table = {"base": ("", "chosen", "rejected"), "p": (record["p_system"], "chosen", "rejected"),
             "n": (record["n_system"], "raw", "chosen")}
    return [{"system": table[w][0], "prompt": record["prompt"], "chosen": record[table[w][1]],
             "rejected": record[table[w][2]], "margin": 0.0,
             "capped": {"chosen": is_capped(record, table[w][1]), "rejected": is_capped(record, table[w][2])}}
            for w in which]


def load_pairs(paths, sso_pairs=("base",)) -> list[dict]:
    """RM pairs {system, prompt, chosen, rejected, margin} from SSO pairs.jsonl or plain JSONL files.

    A record with SSO's fields (p_system, n_system, raw) gives the pairs named in `sso_pairs`;
    any other record needs prompt/chosen/rejected and may carry `system` and a numeric `margin`.
    """
    unknown = set(sso_pairs) - set(SSO_PAIRS)
    if unknown or not sso_pairs:
        raise ValueError(f"--sso-pairs: expected a comma list of {', '.join(SSO_PAIRS)}, got {','.join(sso_pairs)}")
    pairs = []
    for path in paths:
        for n, r in enumerate(read_jsonl(path, required=("prompt", "chosen", "rejected")), 1):
            if any(k in r for k in ("p_system", "n_system", "raw")):
                missing = [k for k in REQUIRED_FIELDS if not isinstance(r.get(k), str)]
                if missing:
                    raise ValueError(f"{path}: record {n} looks like an SSO record but lacks {', '.join(missing)}")
                pairs += sso_rm_pairs(r, sso_pairs)
                continue
            margin = r.get("margin", 0.0)
            if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
                raise ValueError(f"{path}: record {n} has a non-numeric margin {margin!r}")
            system = r.get("system") or ""
            pairs.append({"system": system, "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                          "margin": float(margin), "capped": {k: is_capped(r, k) for k in ("chosen", "rejected")}})
    return pairs


def pair_batch(tokenizer, pairs, cutoff=1024, eot=None) -> dict[str, torch.Tensor]:
    """One right-padded batch: rows [0, P) the chosen sequences, [P, 2P) the rejected ones."""
    eot = end_of_turn_id(tokenizer) if eot is None else eot
    seqs = {"chosen": [], "rejected": []}
    for p in pairs:
        x = prompt_ids(tokenizer, p["system"], p["prompt"])
        for side in seqs:
            seqs[side].append(truncate(x, response_ids(tokenizer, p, side, eot), cutoff))  # capped: a prefix
    batch = collate(seqs["chosen"] + seqs["rejected"], tokenizer.pad_id)
    batch["margin"] = torch.tensor([p["margin"] for p in pairs], dtype=torch.float32)  # [P]
    # the chosen sequences again as one packed row, for the LM term (each its own group)
    batch |= {f"chosen_{k}": v for k, v in collate_groups([(x, [y]) for x, y in seqs["chosen"]]).items()}
    return batch


# --- training and scoring -----------------------------------------------------------------


@dataclass
class RewardConfig:
    lr: float = 1e-5
    epochs: float = 2.0
    steps: int | None = None  # overrides epochs: a fixed budget of optimizer steps
    batch_size: int = 8  # pairs per optimizer step
    micro_batch_size: int = 8  # pairs per forward (2 sequences each)
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    warmup_ratio: float = 0.03  # cosine schedule with 3% warmup (the self-reference recipe)
    max_grad_norm: float = 1.0
    cutoff: int = 1024
    use_margin: bool = False
    lm_coef: float = 0.0
    seed: int = 0


def pair_loss(rm, batch, cfg: RewardConfig) -> tuple[torch.Tensor, dict]:
    """The BT loss (+ margin, + LM term on the chosen response) of one batch from pair_batch."""
    P = batch["margin"].shape[0]
    r = rm(batch["input_ids"], batch["attention_mask"])  # [2P]
    r_chosen, r_rejected = r[:P], r[P:]
    loss = bt_loss(r_chosen, r_rejected, batch["margin"] if cfg.use_margin else None)
    metrics = {"bt_loss": loss.item(), "accuracy": (r_chosen > r_rejected).float().mean().item()}
    if cfg.lm_coef:  # a second forward over the chosen rows, through the fused log-prob path
        chosen_row = {k.removeprefix("chosen_"): v for k, v in batch.items() if k.startswith("chosen_")}
        logp, n = packed_logprobs(rm.body, chosen_row)
        nll = -logp.sum() / n.sum()  # mean token NLL of the chosen responses
        loss = loss + cfg.lm_coef * nll
        metrics["lm_nll"] = nll.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def train_reward_model(rm, tokenizer, pairs, cfg: RewardConfig, progress=True) -> list[dict]:
    """AdamW on shuffled pairs, cosine lr with warmup; `cfg.steps` steps or `cfg.epochs` passes."""
    if not pairs:
        raise ValueError("train_reward_model: no pairs")
    device = rm.head.weight.device
    total = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * len(pairs) / cfg.batch_size)
    order = []  # a fresh shuffle per pass until the budget is covered
    while len(order) < total * cfg.batch_size:
        shuffled = list(range(len(pairs)))
        random.Random(f"{cfg.seed}-{len(order) // len(pairs)}").shuffle(shuffled)
        order += shuffled
    optimizer, params = make_optimizer(rm, cfg)
    eot = end_of_turn_id(tokenizer)
    rm.train()
    history = []
    bar = tqdm(range(total), desc="reward model", disable=not progress)
    for step in bar:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        sums = {}
        for m in range(0, len(idx), cfg.micro_batch_size):
            mb = [pairs[i] for i in idx[m:m + cfg.micro_batch_size]]
            batch = {k: v.to(device) for k, v in pair_batch(tokenizer, mb, cfg.cutoff, eot).items()}
            # fp32 on any CPU: its results were measured so
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, metrics = pair_loss(rm, batch, cfg)
            if not math.isfinite(metrics["loss"]):
                raise RuntimeError(f"reward model: non-finite loss at step {step}")
            (loss * len(mb) / len(idx)).backward()  # mean over the step's pairs
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(mb) / len(idx)
        lr, grad_norm = optimizer_step(optimizer, params, step, total, cfg)
        row = {"step": step + 1, "steps": total, **sums, "lr": lr, "grad_norm": grad_norm}
        history.append(row)
        bar.set_postfix(loss=f"{sums['loss']:.4f}", acc=f"{sums['accuracy']:.2f}")
    rm.eval()
    return history


@torch.no_grad()
def pair_rewards(rm, tokenizer, pairs, batch_size=8, cutoff=1024, progress=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [P], r_rejected [P]) for every pair."""
    device = rm.head.weight.device
    eot = end_of_turn_id(tokenizer)
    chosen, rejected = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="scoring", disable=not progress):
        mb = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pair_batch(tokenizer, mb, cutoff, eot).items()}
        # fp32 on any CPU: its results were measured so
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            r = rm(batch["input_ids"], batch["attention_mask"]).cpu()  # [2P]
        chosen.append(r[:len(mb)])
        rejected.append(r[len(mb):])
    return torch.cat(chosen), torch.cat(rejected)


def evaluate(rm, tokenizer, pairs, batch_size=8, cutoff=1024, progress=False) -> dict:
    """Pairwise accuracy (r_chosen > r_rejected; a tie counts as wrong) with its Wilson 95% interval."""
    r_chosen, r_rejected = pair_rewards(rm, tokenizer, pairs, batch_size, cutoff, progress)
    correct = (r_chosen > r_rejected).tolist()
    k, n = sum(correct), len(correct)
    low, high = wilson_interval(k, n)
    return {"n": n, "correct": k, "accuracy": k / n, "ci_low": low, "ci_high": high,
            "ties": int((r_chosen == r_rejected).sum()), "pair_correct": correct}


# --- command line -------------------------------------------------------------------------


def cmd_train(args):
    which = tuple(w.strip() for w in args.sso_pairs.split(",") if w.strip())
    pairs = load_pairs(args.pairs, which)
    cfg = RewardConfig(lr=args.lr, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                       micro_batch_size=args.micro_batch_size or args.batch_size, cutoff=args.cutoff,
                       use_margin=args.use_margin, lm_coef=args.lm_coef, seed=args.seed)
    torch.manual_seed(args.seed)
    rm, tokenizer = init_reward_model(args.model, seed=args.seed, device=args.device)
    print(f"reward model: {len(pairs)} pairs from {len(args.pairs)} file(s) (SSO records give: {','.join(which)})")
    history = train_reward_model(rm, tokenizer, pairs, cfg)
    recipe = {"model": str(args.model), "pairs": [str(p) for p in args.pairs], "sso_pairs": list(which),
              "n_pairs": len(pairs), **asdict(cfg), "steps_run": len(history)}
    save_reward_model(rm, tokenizer, args.out, extra={
        "reward_recipe.json": json.dumps(recipe, indent=2) + "\n",
        "metrics.jsonl": "".join(json.dumps(h) + "\n" for h in history)})
    if history:
        last = history[-max(1, len(history) // 10):]
        print(f"last 10% of steps: loss {sum(h['loss'] for h in last) / len(last):.4f}, "
              f"train accuracy {sum(h['accuracy'] for h in last) / len(last):.3f}")
    print(f"saved {args.out}")


def cmd_eval(args):
    pairs = load_pairs([args.pairs])
    folders = [args.rm_dir, *args.against]
    results = []
    for folder in folders:
        rm, tokenizer = load_reward_model(folder, device=args.device)
        res = evaluate(rm, tokenizer, pairs, args.batch_size, args.cutoff, progress=True)
        results.append(res)
        print(f"{folder}: accuracy {res['accuracy']:.3f} ({res['correct']}/{res['n']}), "
              f"95% Wilson CI [{res['ci_low']:.3f}, {res['ci_high']:.3f}], ties {res['ties']}")
    for folder, res in zip(args.against, results[1:]):
        d = ifeval.paired_difference(results[0]["pair_correct"], res["pair_correct"])
        print(f"{args.rm_dir} minus {folder}: {d['difference']:+.3f} (paired se {d['se']:.3f}), "
              f"McNemar exact p = {d['p_exact']:.3f} ({d['a_only']} vs {d['b_only']} discordant pairs)")
    if args.json:
        write_json(args.json, [{"rm": str(f), **r} for f, r in zip(folders, results)])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sso_mini.eval.reward", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a reward model on pairs files")
    t.add_argument("--model", default=DEFAULT_MODEL, help="HF model folder, a model's name, or a reward model folder")
    t.add_argument("--pairs", nargs="+", required=True, help="SSO pairs.jsonl and/or prompt/chosen/rejected JSONL")
    t.add_argument("--out", required=True, help="output folder (HF-style)")
    t.add_argument("--sso-pairs", default="base", help="which SSO pairs to use: comma list of base,p,n")
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--epochs", type=float, default=2.0)
    t.add_argument("--steps", type=int, default=None, help="a fixed number of optimizer steps (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    t.add_argument("--micro-batch-size", type=int, default=None, help="pairs per forward (default: batch size)")
    t.add_argument("--cutoff", type=int, default=1024, help="max tokens of a sequence")
    t.add_argument("--use-margin", action="store_true", help="subtract each pair's 'margin' field")
    t.add_argument("--lm-coef", type=float, default=0.0, help="weight of the chosen response's token NLL")
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval", help="pairwise accuracy of reward model(s) on a pairs file")
    e.add_argument("rm_dir")
    e.add_argument("pairs", help="prompt/chosen/rejected JSONL (SSO files: their base pair)")
    e.add_argument("--against", nargs="*", default=[], help="more reward models, compared pairwise (McNemar)")
    e.add_argument("--batch-size", type=int, default=8, help="pairs per forward")
    e.add_argument("--cutoff", type=int, default=1024)
    e.add_argument("--json", help="also write the results here")
    b = sub.add_parser("build-testset", help="build the verifier-labelled test set")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--out", required=True, help="JSONL file (a .recipe.json is written beside it)")
    b.add_argument("--n-prompts", type=int, default=200)
    b.add_argument("--samples", type=int, default=4, help="answers sampled per prompt")
    b.add_argument("--temperature", type=float, default=0.8)
    b.add_argument("--top-p", type=float, default=1.0)
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--max-instructions", type=int, default=2, help="1..N generated instructions per prompt")
    b.add_argument("--batch-size", type=int, default=16, help="prompts per sampler batch")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="overwrite an existing test set")
    for p in (t, e, b):
        p.add_argument("--device", default=None, help="cpu (default) or cuda")
    args = ap.parse_args(argv)
    try:
        {"train": cmd_train, "eval": cmd_eval, "build-testset": verified_pairs.cmd_build_testset}[args.command](args)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
