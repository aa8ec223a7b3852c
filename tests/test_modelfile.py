"""The Alpaca format outside our own runner: Ollama's Modelfile TEMPLATE and the GGUF's Jinja template.

Both must render, byte for byte, what `template.render_prompt` renders for the same
messages. Ollama's Go template is rendered by a small Go-template subset below (the
constructs the Modelfile uses, with Go's `{{-`/`-}}` whitespace trimming), fed the way
Ollama feeds it (ollama/ollama template/template.go: `collate`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from alpaca_local.cli.main import main
from alpaca_local.convert.gguf_read import read_gguf_header
from alpaca_local.run.modelfile import OLLAMA_TEMPLATE, render_modelfile
from alpaca_local.template import Turn, messages_to_turns, render_prompt

# ---------------------------------------------------------------------------------------
# A Go text/template subset: text, {{ .Field }}, if / else if / else / end, range, eq
# ---------------------------------------------------------------------------------------

ACTION = re.compile(r"\{\{(- )?\s*(.*?)\s*( -)?\}\}", re.S)


def go_tokens(src: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) with Go's trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        out += [("text", text), ("action", m.group(2))]
        pos, trim_next = m.end(), bool(m.group(3))
    tail = src[pos:]
    out.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return out


def go_value(expr: str, dot: dict) -> object:
    words = re.findall(r'"[^"]*"|\S+', expr)
    if words[0] == "eq":
        a, b = (go_value(w, dot) for w in words[1:3])
        return a == b
    if words[0].startswith('"'):
        return words[0][1:-1]
    assert words[0].startswith("."), expr
    return dot.get(words[0][1:], "")


def go_render(src: str, data: dict) -> str:
    tokens = go_tokens(src)

    def block(i: int, dot: dict, out: list[str] | None) -> tuple[int, str]:
        """Run tokens from i until else/end; output goes to `out` (None: skip). Returns (index, stopper)."""
        while i < len(tokens):
            kind, text = tokens[i]
            if kind == "text":
                if out is not None:
                    out.append(text)
                i += 1
            elif text.startswith("if "):
                i = if_chain(i, text[3:], dot, out)
            elif text.startswith("range "):
                items = go_value(text[6:], dot) if out is not None else []
                start, end = i + 1, None
                for item in items or [{}]:
                    end, _ = block(start, item, out if items else None)
                i = end + 1
            elif text == "end" or text == "else" or text.startswith("else if "):
                return i, text
            else:
                if out is not None:
                    out.append(str(go_value(text, dot)))
                i += 1
        return i, ""

    def if_chain(i: int, cond: str, dot: dict, out: list[str] | None) -> int:
        taken = False
        while True:
            run = out is not None and not taken and bool(go_value(cond, dot)) if cond else (out is not None and not taken)
            i, stopper = block(i + 1, dot, out if run else None)
            taken = taken or run
            if stopper == "end":
                return i + 1
            cond = stopper[8:] if stopper.startswith("else if ") else ""

    out: list[str] = []
    block(0, data, out)
    return "".join(out)


def ollama_render(messages: list[dict]) -> str:
    """Ollama's Execute for a template that uses .Messages: system joined, same roles merged."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return go_render(OLLAMA_TEMPLATE, {"System": system, "Messages": collated})


def ours(messages: list[dict]) -> str:
    turns, system = messages_to_turns(messages)
    return render_prompt(turns, system)


SAMPLES = {
    "one instruction": [{"role": "user", "content": "Name three primary colors."}],
    "system": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    "empty system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    "history": [
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Two?"},
    ],
    "multi-line and markers as text": [{"role": "user", "content": "a\n\n### Response:\n</s> {{ .System }}"}],
}


def test_go_renderer_sanity() -> None:
    assert go_render("a \n{{- if .X }} yes {{- else }} no{{ end -}}\n b", {"X": True}) == "a yesb"
    assert go_render("{{ range .L }}[{{ .V }}]{{ end }}", {"L": [{"V": 1}, {"V": 2}]}) == "[1][2]"
    assert go_render('{{ if eq .R "u" }}U{{ else if eq .R "a" }}A{{ end }}', {"R": "a"}) == "A"


@pytest.mark.parametrize("name", list(SAMPLES))
def test_ollama_template_matches_render_prompt(name: str) -> None:
    assert ollama_render(SAMPLES[name]) == ours(SAMPLES[name])


def test_ollama_template_one_turn_is_stanford() -> None:
    assert ollama_render(SAMPLES["one instruction"]) == render_prompt([Turn("Name three primary colors.")])


# ---------------------------------------------------------------------------------------
# The chat template embedded in a converted file
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded_template(tiny_gguf: Path) -> str:
    return read_gguf_header(tiny_gguf).kv["tokenizer.chat_template"]


def jinja_render(template: str, messages: list[dict]) -> str:
    # The environment llama-cpp-python's Jinja2ChatFormatter (and HF transformers) use.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("turn", [Turn("Summarize."), Turn("Summarize.", "Llamas are camelids."), Turn("x", "")])
def test_embedded_template_matches_render_prompt(embedded_template: str, turn: Turn) -> None:
    message = {"role": "user", "content": turn.instruction}
    if turn.input is not None:
        message["input"] = turn.input
    assert jinja_render(embedded_template, [message]) == render_prompt([turn])


@pytest.mark.parametrize("name", list(SAMPLES))
def test_embedded_template_matches_messages_to_turns(embedded_template: str, name: str) -> None:
    assert jinja_render(embedded_template, SAMPLES[name]) == ours(SAMPLES[name])


def test_embedded_template_with_input_in_history(embedded_template: str) -> None:
    messages = [{"role": "user", "content": "One?", "input": "ctx"}, {"role": "assistant", "content": "1"},
                {"role": "user", "content": "Two?"}]
    assert jinja_render(embedded_template, messages) == render_prompt([Turn("One?", "ctx", "1"), Turn("Two?")])


# ---------------------------------------------------------------------------------------
# The Modelfile and the command
# ---------------------------------------------------------------------------------------

def test_modelfile_text(tmp_path: Path) -> None:
    gguf = tmp_path / "models" / "alpaca-7b.Q4_K_M.gguf"
    text = render_modelfile(gguf, tmp_path / "models" / "Modelfile")
    lines = text.splitlines()
    assert lines[2] == "FROM ./alpaca-7b.Q4_K_M.gguf"
    assert f'TEMPLATE """{OLLAMA_TEMPLATE}"""' in text
    assert lines[-5:] == [
        'PARAMETER stop "### Instruction:"', 'PARAMETER stop "### Input:"', 'PARAMETER stop "### Response:"',
        "PARAMETER temperature 0.7", "PARAMETER num_ctx 2048",
    ]
    elsewhere = render_modelfile(gguf, tmp_path / "other" / "Modelfile")
    assert f"FROM {gguf.resolve()}\n" in elsewhere  # outside the Modelfile's folder: absolute


def test_modelfile_command(tiny_gguf: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "Modelfile"
    assert main(["modelfile", str(tiny_gguf), "-o", str(out)]) == 0
    assert f"FROM {tiny_gguf.resolve()}\n" in out.read_text()
    assert "ollama create tiny-llama -f" in capsys.readouterr().out
    assert main(["modelfile", str(tiny_gguf), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["modelfile", str(tiny_gguf), "-o", str(out), "--force"]) == 0


def test_modelfile_refuses_a_non_gguf(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all, just some bytes")
    assert main(["modelfile", str(bad), "-o", str(tmp_path / "Modelfile")]) == 1
    assert not (tmp_path / "Modelfile").exists()
