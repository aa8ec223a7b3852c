"""The Stanford Alpaca prompt format: the one place it is written.

Pure functions, no I/O. `render_prompt` builds the exact text the model sees;
`ALPACA_CHAT_TEMPLATE` is the same format as a Jinja chat template, embedded in
converted GGUF files so llama-server, Ollama and LM Studio apply it too.
Templates from the Stanford Alpaca training code (train.py, PROMPT_DICT).
"""

from __future__ import annotations

from dataclasses import dataclass

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
# The headers that open a block; generation stops at any of them.
MARKERS = ("### Instruction:", "### Input:", "### Response:")


@dataclass(frozen=True)
class Turn:
    instruction: str
    input: str | None = None
    response: str | None = None  # None for the turn the model is to answer


def render_prompt(turns: list[Turn], system: str | None = None) -> str:
    """Earlier turns as Instruction/Response pairs, ending with `### Response:` for the last.

    One turn without input or system gives, byte for byte, Stanford's
    "Below is an instruction ... ### Instruction:\\n{instruction}\\n\\n### Response:".
    """
    if not turns:
        raise ValueError("a prompt needs at least one instruction")
    if not system:  # "" too: the Jinja template below treats an empty system message as absent
        system = PREAMBLE_WITH_INPUT if any(t.input for t in turns) else PREAMBLE
    parts = [system]
    for turn in turns:
        parts.append(f"\n\n### Instruction:\n{turn.instruction}")
        if turn.input:
            parts.append(f"\n\n### Input:\n{turn.input}")
        parts.append("\n\n### Response:")
        if turn.response is not None:
            parts.append(f"\n{turn.response}")
    return "".join(parts)


# The same rules in Jinja. Messages: an optional "system" message replaces the
# preamble; each "user" message is an instruction, with an optional "input"
# field for the Input block; "assistant" messages are earlier responses.
ALPACA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', has_input=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
    "{%- elif m['role'] == 'user' and m['input'] is defined and m['input'] -%}{%- set ns.has_input = true -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system -%}{{ ns.system }}"
    "{%- elif ns.has_input -%}" + PREAMBLE_WITH_INPUT + ""
    "{%- else -%}" + PREAMBLE + ""
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ '\\n\\n### Instruction:\\n' + m['content'] }}"
    "{%- if m['input'] is defined and m['input'] -%}{{ '\\n\\n### Input:\\n' + m['input'] }}{%- endif -%}"
    "{{ '\\n\\n### Response:' }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{ '\\n' + m['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def messages_to_turns(messages: list[dict]) -> tuple[list[Turn], str | None]:
    """OpenAI-style chat messages -> (turns, system), by the same rules as ALPACA_CHAT_TEMPLATE.

    A "system" message replaces the preamble (the last one wins, as in the Jinja
    template); each "user" message is an instruction, with the optional non-standard
    "input" field as its Input block; an "assistant" message is the response to the
    user message before it. The last message must be from the user: it is the
    instruction to answer. Content is a string or a list of text parts (joined).
    Raises ValueError naming the bad message.
    """
    turns: list[Turn] = []
    system: str | None = None
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        text = _content_text(m.get("content") if isinstance(m, dict) else None, i)
        if role == "system":
            system = text
        elif role == "user":
            extra = m.get("input")
            if extra is not None and not isinstance(extra, str):
                raise ValueError(f"messages[{i}].input must be a string")
            turns.append(Turn(text, extra or None))
        elif role == "assistant":
            if not turns or turns[-1].response is not None:
                raise ValueError(f"messages[{i}]: an assistant message must follow a user message")
            turns[-1] = Turn(turns[-1].instruction, turns[-1].input, text)
        else:
            raise ValueError(f"messages[{i}]: role {role!r} is not supported; use system, user or assistant")
    if not turns or turns[-1].response is not None:
        raise ValueError("the last message must be from the user: it is the instruction to answer")
    return turns, system


def _content_text(content: object, index: int) -> str:
    """A message's text: a string, None (empty), or OpenAI text parts joined as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ValueError(f"messages[{index}].content must be text (a string or text parts); images are not supported")
