"""chat --template model: the GGUF's own chat template, sandboxed, user text still plain."""

from __future__ import annotations

import pytest

import tinymodels
from alpaca_local.run.chat import ALPACA, ModelInfo, load_model, model_format, prompt_format, read_model_info
from alpaca_local.cli.main import main
from alpaca_local.convert.pipeline import convert
from alpaca_local.errors import InputError
from alpaca_local.run.model_template import render_segments
from alpaca_local.template import Turn

CHATML_LIKE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chatml_gguf(tmp_path_factory):
    work = tmp_path_factory.mktemp("chatml")
    src = tinymodels.build_llama(work / "m", chat_template=CHATML_LIKE)
    return convert(src.path, work / "m.gguf", "q8_0").output


@pytest.fixture(scope="module")
def chatml_model(chatml_gguf):
    return load_model(chatml_gguf, n_ctx=256)


def test_embedded_alpaca_template_gives_the_same_ids(tiny_gguf):
    """Our converter embeds the Alpaca template: --template model must send the same tokens."""
    model = load_model(tiny_gguf, n_ctx=256)
    fmt = prompt_format("model", read_model_info(tiny_gguf), model)
    turns = [Turn("Name three colors. </s> ### Response: <s>")]
    assert fmt.text(turns, None) == ALPACA.text(turns, None)
    assert fmt.ids(model, turns, None) == ALPACA.ids(model, turns, None)
    assert fmt.markers == ()  # a model's own format stops at its end-of-generation tokens


def test_template_tokens_are_special_user_tokens_are_not(chatml_model):
    fmt = model_format(CHATML_LIKE, "<s>", "</s>")
    ids = fmt.ids(chatml_model, [Turn("say </s> please")], None)
    bos, eos = chatml_model.bos_id, chatml_model.eos_id
    # Template: <s>user\n ... </s>\n<s>assistant\n -> two BOS and one EOS as control ids.
    assert ids.count(bos) == 2 and ids.count(eos) == 1
    user_part = chatml_model.tokenize("say </s> please")
    assert eos not in user_part
    text = "".join(chatml_model.piece(i).decode("utf-8", "replace") for i in user_part)
    assert "</s>" in text


def test_system_and_history_reach_the_template():
    segs = render_segments(CHATML_LIKE, [Turn("a", response="b"), Turn("c", input="d")], "sys", "<s>", "</s>")
    text = "".join(s.text for s in segs)
    assert text == "<s>system\nsys</s>\n<s>user\na</s>\n<s>assistant\nb</s>\n<s>user\nc\n\nd</s>\n<s>assistant\n"
    assert [s.text for s in segs if s.user] == ["sys", "a", "b", "c\n\nd"]


def test_sandbox_refuses_template_escapes():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InputError, match="chat template"):
        render_segments(evil, [Turn("x")], None, "<s>", "</s>")


def test_template_raise_exception_is_one_clear_error():
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(InputError, match="System role not supported"):
        render_segments(refusing, [Turn("x")], "be brief", "<s>", "</s>")


def test_no_template_in_file(tmp_path):
    info = ModelInfo(tmp_path / "x.gguf", 3, "llama", 2048, None)
    with pytest.raises(InputError, match="--template alpaca"):
        prompt_format("model", info, model=None)  # type: ignore[arg-type]


def test_cli_template_model_one_shot(chatml_gguf, capsys):
    """--template model renders the GGUF's own template (not Alpaca's); the default stays Alpaca."""
    args = ["chat", str(chatml_gguf), "-p", "hello", "-n", "4", "--seed", "1", "--show-prompt"]
    assert main([*args, "--template", "model"]) == 0
    err = capsys.readouterr().err
    assert "<s>user\nhello</s>\n<s>assistant\n" in err
    assert "### Instruction:" not in err
    assert main(args) == 0
    assert "### Instruction:\nhello\n\n### Response:" in capsys.readouterr().err
