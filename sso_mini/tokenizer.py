"""Tokenizer: the checkpoint's own `tokenizer.json` and chat template. SSO compares responses sampled under different
system prompts, so prompt tokens must be exact: rendered as `transformers.apply_chat_template` does, no BOS of ours.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

# End-of-turn / end-of-text markers of the template families we support (ChatML, Llama-3).
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>")


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict, eos_token_ids=()):
        self.tk = tokenizer
        self.config = config  # tokenizer_config.json, kept for saving
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # newer HF files: [{"name": ..., "template": ...}]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        pad = _token_text(config.get("pad_token")) or self.eos_token
        self.pad_id = self.tk.token_to_id(pad) if pad else 0
        stops = {int(i) for i in eos_token_ids}
        for t in (self.eos_token, *END_TOKENS):
            if t and self.tk.token_to_id(t) is not None:
                stops.add(self.tk.token_to_id(t))
        self.stop_ids = stops
        if self.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
            self._template = env.from_string(self.chat_template)

    @classmethod
    def from_folder(cls, folder: str | Path, eos_token_ids=()) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template_path = folder / "chat_template.jinja"  # newer transformers save it beside the config
        if "chat_template" not in config and template_path.exists():
            config["chat_template"] = template_path.read_text()
        return cls(HFTokenizer.from_file(str(path)), config, eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as written: special tokens in it are parsed, none are added."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json: chat_template)")
        try:  # rendered in Jinja's sandbox: a template cannot reach Python's internals
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.exceptions.SecurityError as e:
            raise ValueError(f"the chat template tried something the sandbox refuses ({e})") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def save(self, folder: str | Path):
        folder = Path(folder)
        self.tk.save(str(folder / "tokenizer.json"))
        config = {**self.config}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def chat(system: str, prompt: str) -> list[dict]:
    """x, x+ or x-: an empty system means no system message, i.e. the template's default."""
    user = {"role": "user", "content": prompt}
    return [{"role": "system", "content": system}, user] if system else [user]


def prompt_ids(tokenizer, system: str, prompt: str) -> list[int]:
    return tokenizer.encode_chat(chat(system, prompt), add_generation_prompt=True)


def end_of_turn_id(tokenizer) -> int:
    """The token the template puts right after an assistant message (<|im_end|>, <|eot_id|>)."""
    marker = "\u2063sso\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                         add_generation_prompt=False)
    return tokenizer.encode(text.split(marker, 1)[1])[0]
