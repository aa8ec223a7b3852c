"""`alpaca-local serve` with a scripted model, for the browser tests: deterministic answers.

    python tests/scripted_server.py MODEL.gguf [serve flags...]

Everything is the real server (`serve.build_app`: RequestGuard, the fair queue, the
Alpaca chat handler, llama-cpp-python's routes and SSE, the page) except generation:
`ScriptedLlama.create_completion` answers from the instruction instead of sampling, so
a test decides what the "model" says (HTML, Markdown) by typing it:
- an instruction starting with "slow" gets an endless answer, one word every 50 ms,
  until max_tokens or until the client leaves (the server's stop flag);
- "flood": max_tokens pieces of 16 KB each, as fast as they are taken (a client that
  does not read fills its socket buffers at once);
- anything else is echoed: "Echo: INSTRUCTION" (+ " | Input: INPUT"), streamed in
  3-character pieces.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alpaca_local.cli.serve_cmd import print_prompt  # noqa: E402
from alpaca_local.run.serve import PlainTextLlama, bind, build_app, load_server_model, serve_forever  # noqa: E402

WORD_SECONDS = 0.05


def reply_for(prompt: str) -> tuple[str, bool]:
    """(answer, slow) for the last turn of an Alpaca prompt."""
    last = prompt.rsplit("### Instruction:\n", 1)[-1].removesuffix("\n\n### Response:")
    instruction, _, extra = last.partition("\n\n### Input:\n")
    if instruction.startswith(("slow", "flood")):
        return instruction, True
    return "Echo: " + instruction + (" | Input: " + extra if extra else ""), False


class ScriptedLlama(PlainTextLlama):
    """The tiny GGUF's tokenizer and context; answers scripted by `reply_for`."""

    last_prompt = ""

    def prompt_ids(self, text: str) -> list[int]:
        self.last_prompt = text  # the chat handler renders, then tokenizes: keep the exact text
        return super().prompt_ids(text)

    def create_completion(self, prompt, **kwargs):  # type: ignore[override]
        max_tokens = kwargs.get("max_tokens") or 16
        text, slow = reply_for(self.last_prompt)
        if text == "flood":
            pieces, slow = ["x" * 16384] * max_tokens, False
        elif slow:
            pieces = [f"word{i} " for i in range(max_tokens)]
        else:
            pieces = [text[i:i + 3] for i in range(0, len(text), 3)][:max_tokens]
        finish = "length" if slow or text == "flood" or len(text) > 3 * max_tokens else "stop"
        head = {"id": "cmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": self.alias or "scripted"}
        if not kwargs.get("stream"):
            return {**head, "object": "text_completion",
                    "choices": [{"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": finish}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": len(pieces), "total_tokens": 1 + len(pieces)}}
        return self._stream(head, pieces, finish, slow)

    def _stream(self, head, pieces, finish, slow):
        for piece in pieces:
            if self._after_token(None, None):  # as llama-cpp-python calls it: the client left, stop
                finish = "stop"
                break
            time.sleep(WORD_SECONDS if slow else 0.01 if len(piece) < 16 else 0)
            yield {**head, "object": "text_completion",
                   "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}]}
        yield {**head, "object": "text_completion",
               "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": finish}]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path)
    p.add_argument("--api-key")
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--send-timeout", type=float, default=30.0)
    p.add_argument("--cors-origin", action="append", default=[])
    p.add_argument("--show-prompt", action="store_true")
    args = p.parse_args()
    llm = load_server_model(args.model, 512, cls=ScriptedLlama, on_prompt=print_prompt if args.show_prompt else None)
    app = build_app(llm, "scripted", args.api_key, max_queue=args.max_queue, send_timeout=args.send_timeout,
                    cors_origins=tuple(args.cors_origin))
    sock = bind("127.0.0.1", 0)
    print(f"serving scripted on http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
    serve_forever(app, sock)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
