"""`alpaca-local modelfile`: write an Ollama Modelfile for a converted model."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """Write an Ollama Modelfile for a converted GGUF: FROM the file, the Alpaca prompt as
a TEMPLATE in Ollama's syntax (a system message replaces the preamble; earlier turns are
history), stop at "### Instruction:", "### Input:" and "### Response:", temperature 0.7,
num_ctx 2048. Then `ollama create NAME -f Modelfile` imports it in one step. Ollama
messages have no Input field: put context in the instruction. LM Studio and llama-server
need nothing: the GGUF already carries the Alpaca chat template."""

EXAMPLES = """examples:
  alpaca-local modelfile models/alpaca-7b.Q4_K_M.gguf -o models/Modelfile
  ollama create alpaca-7b -f models/Modelfile && ollama run alpaca-7b

exit codes: 0 written, 1 bad model, 2 usage error (output exists: --force)."""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text, description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help="GGUF file or name in models/ (default: newest there)")
    p.add_argument("-o", "--output", type=Path, default=Path("Modelfile"), metavar="PATH",
                   help="where to write it (default: ./Modelfile)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")


def run(args: argparse.Namespace) -> int:
    from alpaca_local.run.chat import resolve_model
    from alpaca_local.run.modelfile import ollama_name, write_modelfile

    path = resolve_model(args.model)
    out = write_modelfile(path, args.output, args.force)
    print(f"wrote {out}; import it with: ollama create {ollama_name(path)} -f {out}")
    return 0
