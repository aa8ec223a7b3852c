"""An Ollama Modelfile for a converted GGUF: the Alpaca format in Ollama's Go-template syntax.

In:  a GGUF path and where the Modelfile goes.  Out: the Modelfile text (FROM, TEMPLATE,
stop PARAMETERs, temperature, num_ctx), written atomically.

The TEMPLATE renders what `template.render_prompt` renders for the same messages
(tests/test_modelfile.py checks byte for byte with a Go-template renderer). How Ollama
feeds it (ollama/ollama template/template.go, `Execute` and `collate`): `.System` is all
system messages joined by a blank line, `.Messages` holds the conversation with
consecutive messages of one role merged by a blank line. Ollama messages carry only role
and content, so the Alpaca Input block has no place: put such context in the instruction.
"""

from __future__ import annotations

import os
from pathlib import Path

from alpaca_local.errors import UsageError
from alpaca_local.template import MARKERS, PREAMBLE

DEFAULT_TEMPERATURE = 0.7  # llama.cpp's classic Alpaca settings, as `chat` uses
DEFAULT_NUM_CTX = 2048

# Whitespace matters: `{{-` drops the newlines before an action, so each block below
# emits exactly render_prompt's "\n\n### Instruction:\n...\n\n### Response:" and "\n{response}".
OLLAMA_TEMPLATE = (
    '{{- if .System }}{{ .System }}{{ else }}' + PREAMBLE + '{{ end }}\n'
    '{{- range .Messages }}\n'
    '{{- if eq .Role "user" }}\n'
    '\n'
    '### Instruction:\n'
    '{{ .Content }}\n'
    '\n'
    '### Response:\n'
    '{{- else if eq .Role "assistant" }}\n'
    '{{ .Content }}\n'
    '{{- end }}\n'
    '{{- end }}'
)


def render_modelfile(gguf: Path, modelfile: Path, num_ctx: int = DEFAULT_NUM_CTX) -> str:
    """The Modelfile text; FROM is relative to the Modelfile's folder when the model is inside it."""
    source = _from_path(gguf, modelfile)
    lines = [
        f"# Ollama Modelfile for {gguf.name}, written by alpaca-local: the Stanford Alpaca prompt format.",
        f"# ollama create {ollama_name(gguf)} -f {modelfile.name}",
        f"FROM {source}",
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
        *(f'PARAMETER stop "{marker}"' for marker in MARKERS),
        f"PARAMETER temperature {DEFAULT_TEMPERATURE}",
        f"PARAMETER num_ctx {num_ctx}",
    ]
    return "\n".join(lines) + "\n"


def _from_path(gguf: Path, modelfile: Path) -> str:
    """Ollama reads FROM up to the end of the line and treats a leading quote as quoting."""
    target = gguf.resolve()
    base = modelfile.resolve().parent
    text = f"./{target.relative_to(base).as_posix()}" if target.is_relative_to(base) else str(target)
    if any(c in text for c in '"\n\r') or text != text.strip():
        raise UsageError(f"the model path {text!r} has a quote, a newline or edge spaces, which a Modelfile "
                         "cannot hold; rename or move the file")
    return text


def ollama_name(gguf: Path) -> str:
    """`alpaca-7b.Q4_K_M.gguf` -> `alpaca-7b`: a name `ollama create` accepts."""
    name = gguf.name.split(".")[0].lower()
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "alpaca"


def write_modelfile(gguf: Path, out: Path, force: bool = False) -> Path:
    """Check the model (a whole GGUF), then write the Modelfile atomically; returns `out`."""
    from alpaca_local.convert.atomic import atomic_write, check_target
    from alpaca_local.run.chat import read_model_info

    info = read_model_info(gguf)
    num_ctx = min(DEFAULT_NUM_CTX, info.context_length or DEFAULT_NUM_CTX)
    if out.is_dir():
        out = out / "Modelfile"
    check_target(out, force)
    text = render_modelfile(gguf, out, num_ctx)
    with atomic_write(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    os.utime(out)  # a fresh mtime: `ollama create` users look for the newest file
    return out
