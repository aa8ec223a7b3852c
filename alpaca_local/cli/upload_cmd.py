"""`alpaca-local upload`: a folder of GGUF files (and its README.md) to a Hub repository, one commit."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """Push a folder that `convert --quant ...` wrote (the levels, split parts and the
model card README.md) to a Hugging Face Hub model repository, in one commit, with
huggingface_hub's upload API: the repository is created if needed (--private to keep
it private), large files go by LFS (multipart; Xet when hf_xet is installed and the Hub
offers it), and files the Hub already holds are not sent again. An error before the
commit leaves the repository unchanged; run the same command again to resume.
The token is huggingface_hub's (HF_TOKEN or `hf auth login`); HF_ENDPOINT is honoured."""

EXAMPLES = """examples:
  alpaca-local upload models/alpaca-7b me/alpaca-7b-GGUF
  alpaca-local upload models/alpaca-7b my-org/alpaca-7b-GGUF --private
  alpaca-local upload models/alpaca-7b me/alpaca-7b-GGUF --revision v2 --message "re-quantized"
  alpaca-local convert ./alpaca-7b --quant publish --push me/alpaca-7b-GGUF   # convert, then this

Every visible regular file directly in FOLDER is uploaded (not sub-folders; hidden
files such as a convert's temp files are left out).
exit codes: 0 pushed, 1 no token, no rights, a network or Hub error (nothing committed), 2 usage error,
130 interrupted."""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text, description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="FOLDER", type=Path, help="the folder convert wrote (e.g. models/alpaca-7b)")
    p.add_argument("repo", metavar="ORG/NAME", help="Hub model repository to push to (created if needed)")
    add_push_options(p, revision_flag="--revision")
    p.add_argument("--message", metavar="TEXT", help="commit message (default: Upload N files with alpaca-local)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_push_options(p: argparse.ArgumentParser, revision_flag: str) -> None:
    """--private and the branch flag, shared by `upload` and `convert --push`."""
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its setting)")
    p.add_argument(revision_flag, metavar="BRANCH", dest="push_revision",
                   help="push to this branch, created from main if it does not exist (default: main)")


def run(args: argparse.Namespace) -> int:
    from alpaca_local.publish.upload import upload

    result = upload(args.folder, args.repo, private=args.private, revision=args.push_revision, message=args.message,
                    progress=show_progress(args.json))
    report(result, args.json)
    return 0


def show_progress(as_json: bool) -> bool:
    """huggingface_hub's upload bars on a terminal only: piped or --json, stderr keeps to errors."""
    import sys

    return not as_json and sys.stderr.isatty()


def report(result, as_json: bool) -> None:
    summary = {"repo": result.repo_id, "revision": result.revision, "commit": result.commit,
               "commit_url": result.commit_url, "private": result.private,
               "files": [{"name": n, "size_bytes": s} for n, s in result.files]}
    if as_json:
        import json

        print(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("pushed", f"{result.repo_id} ({result.revision}{', private' if result.private else ''})")
    table.add_row("commit", result.commit)
    table.add_row("files", f"{len(result.files)}, {sum(s for _, s in result.files) / 1e6:,.1f} MB")
    table.add_row("url", result.commit_url)
    Console().print(table)
