"""A model's own chat template (`tokenizer.chat_template` in its GGUF), for `chat --template model`.

In: the Jinja template from the file, turns of instructions. Out: the prompt as
text (for --show-prompt) and as token ids. The template is a stranger's code, so
it runs in Jinja's immutable sandbox. Its own text may hold special tokens
(`<start_of_turn>`, `<|im_start|>`...), which must become control ids, while the
user's words must not: the template is rendered around sentinel strings, then the
template's parts are tokenized with special-token parsing on and the user's parts
with it off.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from alpaca_local.errors import InputError
from alpaca_local.template import Turn


@dataclass(frozen=True)
class Segment:
    text: str
    user: bool  # user text: tokenized with special-token parsing off


def _messages(turns: list[Turn], system: str | None, content) -> list[dict]:
    """Turns as OpenAI-style messages; an Input block follows the instruction after a blank line."""
    messages = [{"role": "system", "content": content(system)}] if system else []
    for turn in turns:
        text = turn.instruction if not turn.input else f"{turn.instruction}\n\n{turn.input}"
        messages.append({"role": "user", "content": content(text)})
        if turn.response is not None:
            messages.append({"role": "assistant", "content": content(turn.response)})
    return messages


@functools.lru_cache(maxsize=4)
def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InputError(f"the model's chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise InputError(f"the model's chat template is not valid Jinja ({exc}); use the default Alpaca template") from None


def render_segments(source: str, turns: list[Turn], system: str | None, bos: str, eos: str) -> list[Segment]:
    """The rendered prompt, split into template text and user text."""
    from jinja2 import TemplateError

    mark = f"\x00{secrets.token_hex(8)}\x00"
    users: list[str] = []

    def sentinel(text: str) -> str:
        users.append(text)
        return f"{mark}{len(users) - 1}{mark}"

    try:
        rendered = _compile(source).render(
            messages=_messages(turns, system, sentinel), add_generation_prompt=True,
            bos_token=bos, eos_token=eos,
        )
    except TemplateError as exc:
        raise InputError(f"the model's chat template failed ({exc}); use the default Alpaca template") from None
    parts = rendered.split(mark)
    segments = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if part:
                segments.append(Segment(part, user=False))
        else:  # a sentinel's index; a template that mangles it would misplace user text
            if not part.isdecimal() or int(part) >= len(users):
                raise InputError("the model's chat template alters message text; use the default Alpaca template")
            segments.append(Segment(users[int(part)], user=True))
    return segments


def fragments(segments: list[Segment], specials_in: Callable[[str], dict[str, int]]) -> list[str | int]:
    """Plain text runs and special-token ids, as llama.cpp partitions a prompt.

    Special tokens are looked for in the template's text only (`specials_in` names
    those a piece of template text holds); the user's words, and the template text
    around them, join into plain runs. Each run is then tokenized in one piece, as
    llama.cpp tokenizes the text between two special tokens.
    """
    out: list[str | int] = []

    def text(t: str) -> None:
        if not t:
            return
        if out and isinstance(out[-1], str):
            out[-1] += t
        else:
            out.append(t)

    for seg in segments:
        specials = {} if seg.user else specials_in(seg.text)
        if not specials:
            text(seg.text)
            continue
        pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        pos = 0
        for m in pattern.finditer(seg.text):
            text(seg.text[pos:m.start()])
            out.append(specials[m.group()])
            pos = m.end()
        text(seg.text[pos:])
    return out
