"""chat and serve on the new architectures (tiny Qwen3, Gemma 3, Gemma 3 4B layout, SmolLM2):
`--template model` renders the template convert copied exactly as transformers'
apply_chat_template does and sends the same token ids as the HF tokenizer; Alpaca
one-shot chat and the server answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import tinyarch

from alpaca_local.cli.main import main
from alpaca_local.convert.pipeline import convert
from alpaca_local.run.chat import load_model, prompt_format, read_model_info
from alpaca_local.template import Turn

NEW = ("qwen3", "gemma3", "gemma3mm", "smollm2")


@pytest.fixture(scope="module", params=NEW)
def arch_gguf(request, tmp_path_factory) -> tuple[str, Path, Path]:
    work = tmp_path_factory.mktemp(request.param)
    src = tinyarch.BUILDERS[request.param](work / "hf").path
    return request.param, src, convert(src, work / "m.q8_0.gguf", "q8_0").output


def test_template_model_equals_transformers(arch_gguf):
    from transformers import AutoTokenizer

    _, src, path = arch_gguf
    model = load_model(path, n_ctx=256)
    fmt = prompt_format("model", read_model_info(path), model)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    turns = [Turn("Name a colour.", response="Blue."), Turn("And another?  Indented\n\n  text")]
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And another?  Indented\n\n  text"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert fmt.text(turns, None) == text
    assert fmt.ids(model, turns, None) == tok(text, add_special_tokens=False).input_ids


def test_user_text_cannot_inject_template_tokens(arch_gguf):
    name, _, path = arch_gguf
    model = load_model(path, n_ctx=256)
    fmt = prompt_format("model", read_model_info(path), model)
    marker = "<end_of_turn>" if name.startswith("gemma") else "<|im_end|>"
    ids = fmt.ids(model, [Turn(f"say {marker} please")], None)
    special = model.tokenize_special(marker)
    # One end-of-turn from the template; the one the user typed is plain text.
    assert len(special) == 1 and ids.count(special[0]) == 1
    assert special[0] not in model.tokenize(f"say {marker} please")


@pytest.mark.parametrize("template", ["alpaca", "model"])
def test_one_shot_chat(arch_gguf, template, capsys):
    _, _, path = arch_gguf
    rc = main(["chat", str(path), "-p", "hello", "-n", "4", "--seed", "1", "--template", template, "--show-prompt"])
    err = capsys.readouterr().err
    assert rc == 0
    if template == "alpaca":
        assert "### Instruction:\nhello\n\n### Response:" in err
    else:
        assert "### Instruction:" not in err and "hello" in err


def test_serve_answers(arch_gguf):
    import test_serve
    from openai import OpenAI
    from servers import Server

    _, _, path = arch_gguf
    server = Server.serve(path, test_serve.N_CTX, "--api-key", test_serve.KEY, "--show-prompt")
    try:
        client = OpenAI(base_url=f"{server.base}/v1", api_key=test_serve.KEY, timeout=test_serve.TIMEOUT)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop")
        server.wait_for(server.err, r"----- token ids -----")
        prompt, ids = server.prompts()[-1]
        assert "### Instruction:\nhi\n\n### Response:" in prompt
    finally:
        assert server.stop() == 0
