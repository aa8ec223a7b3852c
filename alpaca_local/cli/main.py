"""The `alpaca-local` command: parse, call the library, print.

Each subcommand lives in its own module (`convert_cmd`, `plan_cmd`, `chat_cmd`, ...)
exposing `add_parser(subparsers)` and `run(args) -> int`; the module is imported
only when its command runs, so `alpaca-local --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Sequence

from alpaca_local.errors import AlpacaError

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("alpaca_local.cli.convert_cmd", "turn a Hugging Face model folder into one GGUF file"),
    "plan": ("alpaca_local.cli.plan_cmd", "say which quant level fits your GPU, and the memory it takes"),
    "chat": ("alpaca_local.cli.chat_cmd", "talk to a GGUF model in the Stanford Alpaca prompt format"),
    "imatrix": ("alpaca_local.cli.imatrix_cmd", "compute an importance matrix for better quantization (llama-imatrix)"),
    "quality": ("alpaca_local.cli.quality_cmd", "measure what each quant level costs and loses against f16"),
    "serve": ("alpaca_local.cli.serve_cmd", "serve a model on an OpenAI-compatible HTTP API, in the Alpaca format"),
    "modelfile": ("alpaca_local.cli.modelfile_cmd", "write an Ollama Modelfile for a converted model"),
    "upload": ("alpaca_local.cli.upload_cmd", "push a folder of GGUF files and its model card to the Hugging Face Hub"),
}

EPILOG = """examples:
  alpaca-local convert ./alpaca-7b --quant q4_k_m
  alpaca-local plan --vram 8
  alpaca-local chat models/alpaca-7b.Q4_K_M.gguf -p "Name three primary colors."

Run `alpaca-local COMMAND --help` for the flags of one command."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (plus a pointer to --help), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _available_commands() -> dict[str, tuple[str, str]]:
    """Commands whose module is present (a command lands with its module)."""
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_text)
    return found


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alpaca-local",
        description="Run Alpaca-style instruction models on your own machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available_commands().items():
        if only is not None and name != only:
            # Listed in --help without importing the module.
            sub.add_parser(name, help=help_text)
            continue
        importlib.import_module(module).add_parser(sub, name, help_text)
        # --debug also after the command word; SUPPRESS keeps a top-level --debug.
        sub.choices[name].add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
        )
    return parser


def _version() -> str:
    from alpaca_local import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the module of the command being run (first non-flag word).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    commands = _available_commands()
    parser = build_parser(only=chosen if chosen in commands else "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: return the code, callers may be in-process
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(commands[args.command][0])
    try:
        return int(module.run(args) or 0)
    except AlpacaError as exc:
        if args.debug:
            raise
        print(f"alpaca-local {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"alpaca-local {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
