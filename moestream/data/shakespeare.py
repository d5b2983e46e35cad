"""The embedded model's training text as conversations, shared by the trainer and the tests.

The play text is a run of blocks "SPEAKER:\\nlines". Each speech becomes a user turn and the next
speech the assistant's reply (prefixed with its speaker's name), so the model answers in kind.
The last 10% of conversations (the end of the text) are held out for validation.
"""

from __future__ import annotations

import re
from pathlib import Path

TEXT = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"  # in the source tree only
HELD_OUT_FRACTION = 0.1


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, lines) for every block "NAME:\\nlines" of the play text."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        head, _, body = block.partition("\n")
        if head.endswith(":") and body.strip():
            out.append((head[:-1].strip(), body.strip()))
    return out


def conversations(text: str) -> list[list[dict]]:
    """Each speech answered by the next: user = the lines, assistant = "NAME:\\nreply"."""
    pairs = speeches(text)
    return [
        [{"role": "user", "content": a[1]}, {"role": "assistant", "content": f"{b[0]}:\n{b[1]}"}]
        for a, b in zip(pairs, pairs[1:])
    ]


def split(convs: list) -> tuple[list, list]:
    """(training, held-out) conversations."""
    cut = int(len(convs) * (1 - HELD_OUT_FRACTION))
    return convs[:cut], convs[cut:]


def held_out_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first `n_tokens` of the held-out conversations, in the chat template (for evaluations)."""
    ids: list[int] = []
    for conv in split(conversations(TEXT.read_text()))[1]:
        ids += tokenizer.encode_chat(conv, add_generation_prompt=False)
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]
