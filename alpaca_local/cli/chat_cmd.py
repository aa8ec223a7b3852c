"""`alpaca-local chat`: flags, one-shot mode and the interactive REPL around `chat`.

One-shot (`-p TEXT`, or text piped on stdin) prints only the response on stdout, so
it pipes; `--show-prompt` then goes to stderr. On a terminal it is a REPL with line
editing, multi-line input, slash commands and Ctrl-C that stops only the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from alpaca_local.cli import cpu_flags, gpu_split, lora_flags

if TYPE_CHECKING:
    from alpaca_local.run.chat import Done, Piece, Sampling, TokenModel
    from alpaca_local.template import Turn

DESCRIPTION = """Talk to a GGUF model in the exact Stanford Alpaca prompt format. Your words are
tokenized as plain text inside the template, so they can never change it."""

EXAMPLES = """examples:
  alpaca-local chat models/alpaca-7b.Q4_K_M.gguf -p "Name three primary colors."
  alpaca-local chat alpaca-7b -p "Summarize this." --input "$(cat notes.txt)"
  echo "Write a haiku about llamas." | alpaca-local chat --json
  alpaca-local chat                      # REPL with the newest model in models/

MODEL is a .gguf path, a name in models/ (alpaca-7b -> models/alpaca-7b.*.gguf),
or left out for the most recently converted model there.
exit codes: 0 done, 1 bad model or prompt, 2 usage error, 130 interrupted."""

REPL_HELP = """Type an instruction and press Enter. End a line with \\ to continue it, or wrap
several lines in \"\"\" ... \"\"\".
  /input TEXT   attach TEXT as the Input block of the next instruction
  /input        clear that input
  /reset        forget earlier turns (with --history) and any pending input
  /help         this text
  /quit         leave (or Ctrl-D); Ctrl-C stops an answer, not the session"""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text, description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help="GGUF file or name in models/ (default: newest there)")
    p.add_argument("-p", "--prompt", metavar="TEXT", help="answer this one instruction and exit")
    p.add_argument("--input", metavar="TEXT", help="the Input block (context) for the instruction")
    p.add_argument("-n", "--n-predict", type=int, default=256, metavar="N",
                   help="most tokens to generate; -1 until the context is full (default: 256)")
    p.add_argument("--temp", type=float, default=0.7, help="temperature; 0 is greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling (default: 0.95)")
    p.add_argument("--top-k", type=int, default=40, metavar="K", help="top-k sampling; 0 off (default: 40)")
    p.add_argument("--repeat-penalty", type=float, default=1.1, metavar="X", help="(default: 1.1)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("-c", "--ctx", type=int, default=2048, metavar="N", help="context length in tokens (default: 2048)")
    gpu_split.add_arguments(p)
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: llama.cpp's)")
    p.add_argument("--system", metavar="TEXT", help="replace the Alpaca preamble sentence")
    p.add_argument("--template", choices=("alpaca", "model"), default="alpaca",
                   help="prompt format: alpaca (Stanford Alpaca, the default) or model (the chat template "
                        "embedded in the GGUF, for models trained on another format)")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the exact prompt and token ids first (stderr in one-shot mode)")
    p.add_argument("--history", action="store_true",
                   help="REPL: send earlier turns too, dropping the oldest when the context is full")
    p.add_argument("--json", action="store_true", help="one-shot: print response, token counts and timings as JSON")
    lora_flags.add_runtime_arguments(p)
    cpu_flags.add_no_repack(p)


def run(args: argparse.Namespace) -> int:
    from alpaca_local.run.chat import load_model, lora_kwargs, prompt_format, read_model_info, resolve_model

    sampling = _sampling(args)
    instruction = _one_shot_instruction(args)
    path = resolve_model(args.model)
    split = gpu_split.resolve(args, path)
    if split.note:
        print(f"note: {split.note}", file=sys.stderr)
    model = load_model(path, args.ctx, split.n_gpu_layers, args.threads, args.no_repack, split.n_cpu_moe,
                       **lora_kwargs(args.lora, args.lora_scale, path))
    args.format = prompt_format(args.template, read_model_info(path), model)
    if instruction is not None:
        return _one_shot(model, instruction, args, sampling, str(path))
    return Repl(model, args, sampling).loop()


def _sampling(args: argparse.Namespace) -> Sampling:
    from alpaca_local.run.chat import Sampling
    from alpaca_local.errors import UsageError

    checks = [
        (args.n_predict >= -1, f"-n {args.n_predict}: give -1 (until the context is full) or more"),
        (args.temp >= 0, f"--temp {args.temp}: give 0 (greedy) or more"),
        (0 < args.top_p <= 1, f"--top-p {args.top_p}: give a value in (0, 1]"),
        (args.top_k >= 0, f"--top-k {args.top_k}: give 0 (off) or more"),
        (args.repeat_penalty > 0, f"--repeat-penalty {args.repeat_penalty}: give a value above 0 (1 is off)"),
        (args.threads is None or 1 <= args.threads <= 1024, f"--threads {args.threads}: give 1 to 1024"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    gpu_split.check(args)
    return Sampling(args.n_predict, args.temp, args.top_p, args.top_k, args.repeat_penalty, args.seed)


def _one_shot_instruction(args: argparse.Namespace) -> str | None:
    """The instruction from -p, or from stdin when it is not a terminal; None means REPL."""
    from alpaca_local.errors import UsageError

    if args.prompt is not None:
        text = args.prompt
    elif not sys.stdin.isatty():
        text = sys.stdin.read().rstrip("\n")  # the newline that ends a piped line is not the user's
    else:
        return None
    if not text.strip():
        raise UsageError("the instruction is empty; give -p TEXT or pipe text on stdin")
    return text


def _one_shot(model: TokenModel, instruction: str, args: argparse.Namespace, sampling: Sampling, path: str) -> int:
    from alpaca_local.run.chat import ALPACA, Done, generate
    from alpaca_local.template import Turn

    fmt = getattr(args, "format", ALPACA)
    turns = [Turn(instruction, args.input or None)]
    prompt, ids = fmt.text(turns, args.system), fmt.ids(model, turns, args.system)
    if args.show_prompt:
        print_prompt(prompt, ids, sys.stderr)
    done: Done | None = None
    try:
        for item in generate(model, ids, sampling, markers=fmt.markers):
            if isinstance(item, Done):
                done = item
            elif not args.json:
                # Stream as it comes: `chat -p ... | less` shows the answer growing.
                sys.stdout.write(item.text)
                sys.stdout.flush()
        assert done is not None  # generate always ends with Done unless interrupted
        if args.json:
            print(json.dumps({"model": path, **done.as_dict()}, indent=2, ensure_ascii=False))
        else:
            sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`| head -1`): not an error. Point stdout at /dev/null so
        # Python's flush at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def print_prompt(prompt: str, ids: list[int], out: TextIO) -> None:
    print(f"----- prompt ({len(ids)} tokens) -----", file=out)
    print(prompt, file=out)
    print("----- token ids -----", file=out)
    print(ids, file=out)
    print("-----", file=out, flush=True)


# ---------------------------------------------------------------------------------------
# REPL
# ---------------------------------------------------------------------------------------

@dataclass
class Session:
    """What the REPL remembers between turns."""

    history: list[Turn] = field(default_factory=list)
    pending_input: str | None = None


class Repl:
    PROMPT, MORE = ">>> ", "... "

    def __init__(self, model: TokenModel, args: argparse.Namespace, sampling: Sampling) -> None:
        from rich.console import Console

        from alpaca_local.run.chat import ALPACA

        self.model, self.args, self.sampling = model, args, sampling
        self.format = getattr(args, "format", ALPACA)
        # No highlighting or :emoji: codes: the model's text is shown exactly as generated.
        self.console = Console(highlight=False, emoji=False)
        self.session = Session(pending_input=args.input or None)

    def loop(self) -> int:
        _enable_line_editing()
        self.console.print("[dim]Alpaca chat. /help for commands, Ctrl-D to leave.[/dim]")
        while True:
            try:
                text = self._read_message()
            except EOFError:
                self.console.print()
                return 0
            except KeyboardInterrupt:
                self.console.print()  # Ctrl-C at the prompt drops the line being typed
                continue
            if not text.strip():
                continue
            if text.startswith("/") and not self._command(text):
                return 0
            elif not text.startswith("/"):
                self._turn(text)

    def _read_message(self) -> str:
        """One instruction: `\\` at a line's end continues it; \"\"\" opens a block until \"\"\"."""
        line = input(self.PROMPT)
        if line.strip().startswith('"""'):
            return self._read_block(line.strip()[3:])
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = input(self.MORE)
        lines.append(line)
        return "\n".join(lines)

    def _read_block(self, first: str) -> str:
        lines = [first] if first else []
        while True:
            line = input(self.MORE)
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)

    def _command(self, text: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, rest = text.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/input":
            self.session.pending_input = rest.strip() or None
            said = "attached to the next instruction" if rest.strip() else "cleared"
            self.console.print(f"[dim]input {said}[/dim]")
        elif name == "/reset":
            self.session = Session()
            self.console.print("[dim]history and input cleared[/dim]")
        elif name == "/help":
            self.console.print(REPL_HELP, markup=False)
        else:
            self.console.print(f"[red]unknown command {name}[/red]; /help lists them", markup=True)
        return True

    def _turn(self, instruction: str) -> None:
        from alpaca_local.run.chat import generate
        from alpaca_local.errors import AlpacaError
        from alpaca_local.template import Turn

        current = Turn(instruction, self.session.pending_input)
        stream = None
        try:
            turns = self._turns_to_send(current)
            prompt, ids = self.format.text(turns, self.args.system), self.format.ids(self.model, turns, self.args.system)
            self.session.pending_input = None  # sent: an input goes with one instruction only
            if self.args.show_prompt:
                print_prompt(prompt, ids, sys.stdout)
            stream = generate(self.model, ids, self.sampling, markers=self.format.markers)
            done = self._stream(stream)
        except AlpacaError as exc:
            self.console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
            return
        except KeyboardInterrupt:
            # Anywhere in the turn, prompt evaluation included: drop this answer, keep the session.
            if stream is not None:
                stream.close()
            self.model.reset()
            self.console.print("\n[yellow]\\[stopped][/yellow]")  # \\[ is a literal "[" in rich markup
            return
        if self.args.history:
            self.session.history.append(Turn(current.instruction, current.input, done.text))

    def _turns_to_send(self, current: Turn) -> list[Turn]:
        from alpaca_local.run.chat import fit_history

        if not self.args.history:
            return [current]

        def count(prompt: str) -> int:
            return self.format.count(self.model, prompt)

        # Room for the answer: -n tokens, but at most half the context, so a large -n
        # does not push out all history (generation stops at the context's end anyway).
        reserve = min(max(self.sampling.max_tokens, 0), self.model.n_ctx // 2)
        turns = fit_history(
            self.session.history, current, self.args.system, count, self.model.n_ctx, reserve, self.format.text
        )
        dropped = len(self.session.history) - (len(turns) - 1)
        if dropped:
            self.console.print(f"[dim]({dropped} oldest turn(s) left out to fit the context)[/dim]")
        return turns

    def _stream(self, items: Iterator[Piece | Done]) -> Done:
        """Show pieces as they come, then a one-line summary."""
        from alpaca_local.run.chat import Done

        done = None
        for item in items:
            if isinstance(item, Done):
                done = item
            else:
                self.console.print(item.text, end="", markup=False, soft_wrap=True)
                self.console.file.flush()
        self.console.print()
        assert done is not None  # generate always ends with Done unless interrupted
        self.console.print(
            f"[dim]{done.completion_tokens} tokens, {done.tokens_per_second:.1f} tok/s, stop: {done.stop}[/dim]"
        )
        return done


def _enable_line_editing() -> None:
    """Importing readline gives input() editing and in-session history (absent on Windows)."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass
