"""sso-mini's pairs for TRL's DPOTrainer: `python -m sso_mini.export_trl PAIRS.jsonl OUT.jsonl`.

Each record's base pair (x: y+ > y-) becomes one row of TRL's conversational form; the steering pairs
under x+ and x- have no place in a DPO trainer, so their system prompts ride along as fields only.
"""

import json
import sys
from pathlib import Path

from .batches import is_capped
from .records import read_jsonl, write_jsonl
from .tokenizer import chat


def trl_record(record: dict) -> dict:
    """One base pair (x: y+ > y-) in the conversational form TRL's DPO trainer reads as it is: `prompt` a
    list of messages (no system message, as sso-mini samples x), `chosen` / `rejected` one assistant
    message each, so that TRL applies the model's own chat template; the principle fields ride along."""
    return {"prompt": chat(record.get("system", ""), record["prompt"]),
            "chosen": [{"role": "assistant", "content": record["chosen"]}],
            "rejected": [{"role": "assistant", "content": record["rejected"]}],
            **{k: record[k] for k in ("p_system", "n_system", "features") if k in record}}


def export_trl(pairs_path, out_path) -> dict:
    """pairs.jsonl -> TRL's conversational JSONL. A pair with a capped response is left out: the chat
    template would close it with the end-of-turn token, a finished answer where sso-mini trains a prefix."""
    records = read_jsonl(pairs_path, required=("prompt", "chosen", "rejected"))
    kept = [r for r in records if not (is_capped(r, "chosen") or is_capped(r, "rejected"))]
    write_jsonl(out_path, [trl_record(r) for r in kept])
    return {"pairs": len(records), "exported": len(kept), "left_out_capped": len(records) - len(kept)}


def main(argv=None):
    """`python -m sso_mini.export_trl PAIRS OUT`: export PAIRS (a pairs.jsonl) for TRL's DPOTrainer."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m sso_mini.export_trl PAIRS.jsonl OUT.jsonl  (TRL's conversational form)",
              file=sys.stderr)
        return 2
    try:
        print(json.dumps(export_trl(Path(argv[0]), Path(argv[1]))))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
