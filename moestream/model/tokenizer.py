"""Tokenizer: `tokenizer.json` through the `tokenizers` library, the chat template through Jinja.

The checkpoint's own template (tokenizer_config.json `chat_template`) is rendered, not re-implemented,
so a model's quirks come with it; the built-in Llama 4 template is only a fallback. Rendered text
already starts with <|begin_of_text|>, so it is encoded without adding a second BOS.

A message's content is text or, OpenAI-style, a list of parts: {"type": "text", "text": ...} and
image parts (model/images.py PART_FORMS). The template sees each image as {"type": "image"} and
writes one <|image|> for it, as Llama 4's own template does; a template that only prints content as
text (the embedded model's) gets the parts joined, images as <|image|>. Each <|image|> is then
expanded into the image's token layout (images.expand_image_tokens), exactly as Llama4Processor does.
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
from . import images

LLAMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|header_start|>{{ m['role'] }}<|header_end|>\n\n{{ m['content'] | trim }}<|eot|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
LLAMA4_STOP_TOKENS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")
PARTS_PROBE = [{"role": "user", "content": [{"type": "text", "text": "«a»"}, {"type": "image"}, {"type": "text", "text": "«b»"}]}]


def chat_parts(messages: list) -> tuple[list, list[dict]]:
    """(the messages as the template takes them, their image parts in order). A content list is checked
    part by part (one line naming the message and part); its image parts become {"type": "image"}."""
    out, found = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"message {i} part {j}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "image_url"):
                images.image_source(part, where)
                parts.append({"type": "image"})
                found.append(part)
            else:
                raise MoestreamError(f'{where} is not {{"type": "text", "text": TEXT}} or an image part ({images.PART_FORMS})')
        out.append({**m, "content": parts})
    return out, found


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
        try:  # does the template write content parts itself (Llama 4's), or only print content as text?
            self.renders_parts = "«a»<|image|>«b»" in self._render(PARTS_PROBE, True)
        except MoestreamError:
            self.renders_parts = False

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`; adds BOS unless asked not to or the text already starts with it."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def token_id(self, text: str) -> int | None:
        """The id of one token (a special token such as <|patch|>), None if the vocabulary lacks it."""
        return self.tok.token_to_id(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def stream_decoder(self):
        """A callable id -> new text (may be "" while a multi-byte character is incomplete)."""
        stream = DecodeStream(skip_special_tokens=True)
        return lambda token_id: stream.step(self.tok, token_id) or ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._render(self._template_messages(messages)[0], add_generation_prompt)

    def _template_messages(self, messages: list) -> tuple[list, list[dict]]:
        """chat_parts' messages, with content lists joined for a template that cannot take them."""
        messages, found = chat_parts(messages)
        if not self.renders_parts:  # joined: text parts as they are, each image as <|image|>
            messages = [{**m, "content": "".join(p.get("text", images.IMAGE_PLACEHOLDER) for p in m["content"])}
                        if isinstance(m.get("content"), list) else m for m in messages]
        return messages, found

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, tools=None
            )
        except TemplateError as e:
            raise MoestreamError(f"the chat template failed on these messages: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    aspect_ratios: list[tuple[int, int]] | None = None, patches_per_tile: int = 144) -> list[int]:
        """Token ids of a chat. aspect_ratios: each image's tiles (rows, cols), in order, when the messages
        hold images; each <|image|> the template wrote becomes that image's layout of patches_per_tile
        <|patch|> tokens per tile."""
        messages, found = self._template_messages(messages)
        text = self._render(messages, add_generation_prompt)
        if found or aspect_ratios:  # checks that each image has its <|image|> (a text part may write one of its own)
            text = images.expand_image_tokens(text, list(aspect_ratios or []), patches_per_tile)
        return self.encode(text, bos=False)


def _raise_template_error(message: str):
    raise TemplateError(message)
