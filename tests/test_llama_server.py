"""Our converted GGUF in llama.cpp's own `llama-server --jinja`: the move to continuous batching.

llama-server is built from the llama.cpp vendored in the pinned llama-cpp-python sdist
(tests/llama_tools.py, CMake, cached). It serves the tiny model converted by our
converter, with the Alpaca chat template we embed, and we check:
- `/apply-template` renders our template byte for byte as `template.render_prompt`
  (system message, history), and the prompt `/v1/chat/completions` actually evaluated
  (echoed by `--verbose` as `__verbose.prompt`) is BOS + that text;
- an `input` field on a message does not reach the template there (llama-server keeps
  only the standard message fields), which the README says;
- with the stop strings the README documents, generation ends before a marker: a GBNF
  grammar makes the model write one, so the stop is exercised, not hoped for.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from alpaca_local.template import MARKERS, Turn, render_prompt
from servers import TIMEOUT

pytestmark = pytest.mark.integration

# The stop strings for llama-server and other OpenAI-style servers (README, "llama-server").
STOP = list(MARKERS)
FORCED = "Sure.\n\n### Instruction:\nAnd another thing"  # what the grammar makes the model say


@pytest.fixture(scope="module")
def llama_server(tiny_gguf: Path, tmp_path_factory):
    from llama_tools import llama_tool

    import socket

    exe = llama_tool("llama-server")  # builds on first use (minutes), cached after
    with socket.socket() as s:  # a free port; llama-server has no port 0
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "-m", str(tiny_gguf), "--jinja", "--host", "127.0.0.1", "--port", str(port),
                                 "-c", "512", "-np", "2", "--verbose", "--no-webui"],
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"llama-server did not start: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        LOGS[base] = log
        yield base
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


LOGS: dict[str, Path] = {}  # each started server's log, by base URL


def test_built_without_amx(llama_server) -> None:
    """Issue 21: the tools are built with AMX compiled out (tests/llama_tools.py), so on an AMX CPU
    they place the q8_0 weights as alpaca-local's own loads do, not in the AMX buffer that crashes."""
    log = LOGS[llama_server].read_text(errors="replace")
    info = next(line for line in log.splitlines() if "CPU : " in line and ("SSE3" in line or "NEON" in line))
    assert "AMX_INT8 = 1" not in info
    buffers = re.findall(r"(\S+) model buffer size", log)
    assert buffers and set(buffers) <= {"CPU", "CPU_Mapped", "CPU_REPACK"}, buffers


def post(base: str, path: str, payload: dict) -> dict:
    request = urllib.request.Request(base + path, json.dumps(payload).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.load(response)


HISTORY = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Name another."},
]


@pytest.mark.parametrize("messages, turns, system", [
    ([{"role": "user", "content": "Give three tips for staying healthy."}],
     [Turn("Give three tips for staying healthy.")], None),
    (HISTORY, [Turn("Name a color.", None, "Red."), Turn("Name another.")], "You answer briefly."),
])
def test_apply_template_is_ours_byte_for_byte(llama_server, messages, turns, system) -> None:
    assert post(llama_server, "/apply-template", {"messages": messages})["prompt"] == render_prompt(turns, system)


def test_chat_completions_evaluates_that_prompt(llama_server, tiny_gguf) -> None:
    """The tokens it evaluated (echoed detokenized, with --verbose) are BOS + our prompt's, as `serve` sends them."""
    import llama_cpp

    from alpaca_local.run import chat

    chat.silence_llama_cpp()
    vocab = chat.LlamaModel(llama_cpp.Llama(model_path=str(tiny_gguf), vocab_only=True, verbose=False))
    messages = [{"role": "user", "content": "Summarize the text in one sentence."}]
    result = post(llama_server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0})
    ids = chat.prompt_ids(vocab, render_prompt([Turn("Summarize the text in one sentence.")]))
    assert result["usage"]["prompt_tokens"] == len(ids)
    assert result["__verbose"]["prompt"] == vocab.llm.detokenize(ids, special=True).decode()


def test_the_input_field_does_not_reach_llama_servers_template(llama_server) -> None:
    messages = [{"role": "user", "content": "Summarize.", "input": "Llamas are camelids."}]
    prompt = post(llama_server, "/apply-template", {"messages": messages})["prompt"]
    assert prompt == render_prompt([Turn("Summarize.")])


def grammar_for(text: str) -> str:
    """GBNF that accepts exactly `text` (llama.cpp's grammar syntax, JSON-style string escapes)."""
    return "root ::= " + json.dumps(text)


@pytest.mark.parametrize("stream", [False, True])
def test_the_documented_stop_strings_end_the_answer_before_a_marker(llama_server, stream) -> None:
    request = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 64, "temperature": 0,
               "grammar": grammar_for(FORCED)}
    unstopped = post(llama_server, "/v1/chat/completions", request)["choices"][0]["message"]["content"]
    assert unstopped == FORCED  # the model does write the marker when nothing stops it
    if not stream:
        choice = post(llama_server, "/v1/chat/completions", {**request, "stop": STOP})["choices"][0]
        content, finish = choice["message"]["content"], choice["finish_reason"]
    else:
        content, finish = _stream(llama_server, {**request, "stop": STOP, "stream": True})
    assert content == "Sure.\n\n" and finish == "stop"
    assert not any(m in content for m in MARKERS)


def _stream(base: str, payload: dict) -> tuple[str, str | None]:
    request = urllib.request.Request(base + "/v1/chat/completions", json.dumps(payload).encode(),
                                     {"content-type": "application/json"})
    content, finish = "", None
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"]
                if choice:
                    content += choice[0]["delta"].get("content") or ""
                    finish = choice[0]["finish_reason"] or finish
    return content, finish
