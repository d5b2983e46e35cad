"""Tokenizer: `tokenizer.json` through the `tokenizers` library, the chat template through Jinja.

The checkpoint's own template (tokenizer_config.json `chat_template`) is rendered, not re-implemented,
so a model's quirks come with it; the built-in Llama 4 template is only a fallback. Rendered text
already starts with <|begin_of_text|>, so it is encoded without adding a second BOS.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from ..errors import MoestreamError

LLAMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|header_start|>{{ m['role'] }}<|header_end|>\n\n{{ m['content'] | trim }}<|eot|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
LLAMA4_STOP_TOKENS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoestreamError(f"{path} is not valid JSON: re-download it") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, directory: str | Path, eos_ids: list[int] | None = None):
        directory = Path(directory)
        try:
            self.tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the library raises a bare Exception on bad files
            raise MoestreamError(f"cannot read {directory / 'tokenizer.json'}: {e}") from None
        cfg = _read_json(directory / "tokenizer_config.json")
        gen = _read_json(directory / "generation_config.json")

        self.bos_token = _token_text(cfg.get("bos_token")) or "<|begin_of_text|>"
        self.bos_id = self.tok.token_to_id(self.bos_token)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None:
            chat_template = directory / "chat_template.jinja"
            template = chat_template.read_text() if chat_template.exists() else LLAMA4_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise MoestreamError(f"the chat template in tokenizer_config.json does not parse: {e}") from None

        stop = set(eos_ids or [])
        gen_eos = gen.get("eos_token_id")
        stop.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        for text in LLAMA4_STOP_TOKENS + (_token_text(cfg.get("eos_token")),):
            tid = self.tok.token_to_id(text) if text else None
            if tid is not None:
                stop.add(tid)
        self.stop_ids = stop

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`; adds BOS unless asked not to or the text already starts with it."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def stream_decoder(self):
        """A callable id -> new text (may be "" while a multi-byte character is incomplete)."""
        stream = DecodeStream(skip_special_tokens=True)
        return lambda token_id: stream.step(self.tok, token_id) or ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, tools=None
            )
        except TemplateError as e:
            raise MoestreamError(f"the chat template failed on these messages: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt), bos=False)


def _raise_template_error(message: str):
    raise TemplateError(message)
