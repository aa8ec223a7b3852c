"""A folder of GGUF files to a Hub model repository in one commit, with huggingface_hub's upload API.

In:  a folder (the levels, their split parts, README.md), `org/name`, private or not, a
     branch; the token huggingface_hub finds (HF_TOKEN, `hf auth login`); HF_ENDPOINT.
Out: one commit on that branch (the repository created if needed), checked afterwards:
     every file is in the commit with its local size.

How: `HfApi.create_repo(exist_ok=True)`, `create_branch(exist_ok=True)` for a branch, then
one `create_commit` of the files: huggingface_hub asks the Hub which files are LFS, sends
their bytes (0.x/1.x: the LFS batch API, one PUT or multipart parts for large files, Xet
offered when hf_xet is installed and chosen by the Hub for Xet repositories; 2.x with hf_xet:
the Xet protocol only), skips every object the Hub already holds, and only then makes the
commit. Not `upload_folder`: from huggingface_hub 2.0 it commits a large folder in several
batches (`_upload_pipeline`), and a failure between them would leave a repository with some
levels and not the others. So an error or Ctrl-C before the commit leaves the repository as
it was, and the same command run again resumes: what was already uploaded is not sent
again. huggingface_hub retries a dropped or 5xx upload itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alpaca_local.errors import InputError, RuntimeFailure, UsageError
from alpaca_local.publish.card import is_hub_id

RESUME = "run the same command again to resume (uploaded files are not sent again)"


@dataclass(frozen=True)
class UploadResult:
    repo_id: str
    revision: str
    commit: str
    commit_url: str
    files: tuple[tuple[str, int], ...]  # (name in the repository, bytes)
    private: bool


def check_repo_id(repo_id: str) -> str:
    if not is_hub_id(repo_id):
        raise UsageError(f"{repo_id!r} is not a Hub repository id; give org/name, e.g. me/my-model-GGUF")
    return repo_id


def files_to_upload(folder: Path, names: Sequence[str] | None = None) -> list[Path]:
    """The files of `folder` to push: `names`, or every visible regular file in it (not in
    sub-folders; hidden names such as a convert's temp files are left out)."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give the folder convert wrote (e.g. models/<name>)")
    if names is not None:
        paths = [folder / n for n in names]
    else:
        paths = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    chosen = []
    for p in paths:
        if p.is_symlink() or not p.is_file():
            if names is None and p.is_dir() and not p.is_symlink():
                continue
            raise InputError(f"{p} is not a regular file; only the folder's own files are uploaded")
        chosen.append(p)
    if not chosen:
        raise InputError(f"{folder} holds no files to upload; convert into it first (convert SRC --quant ... -o {folder})")
    return chosen


def _api():
    from huggingface_hub import HfApi, constants

    # huggingface_hub reads HF_ENDPOINT once, at import; read it again (as source/hub.py does).
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    return HfApi(endpoint=endpoint)


def check_token(repo_id: str, resume: str = RESUME) -> None:
    """Before any long work: a token exists and the Hub accepts it; a read-only token is refused."""
    from huggingface_hub import get_token

    if get_token() is None:
        raise InputError("no Hugging Face token; set HF_TOKEN or run `hf auth login` with a token that can write "
                         f"to {repo_id}")
    try:
        who = _api().whoami()
    except Exception as exc:  # noqa: BLE001 (translated into one line)
        raise _translate(exc, repo_id, resume) from None
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise InputError(f"the Hugging Face token is read-only; {repo_id} needs a token with write access "
                         "(hf auth login, or HF_TOKEN)")


def upload(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
           names: Sequence[str] | None = None, message: str | None = None, resume: str = RESUME,
           progress: bool = True) -> UploadResult:
    """Push `folder` (or its files `names`) to `repo_id` in one commit; see the module docstring.
    `resume`: what the error line tells the user to do after a failure (nothing was committed);
    `progress`: huggingface_hub's own bars (bytes, rate, ETA per file) on stderr."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    check_repo_id(repo_id)
    paths = files_to_upload(folder, names)
    check_token(repo_id, resume)
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        return _upload(folder, repo_id, paths, private, revision, message, resume)
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()


def _upload(folder: Path, repo_id: str, paths: list[Path], private: bool, revision: str | None,
            message: str | None, resume: str) -> UploadResult:
    from huggingface_hub import CommitOperationAdd

    api = _api()
    branch = revision or "main"
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id, repo_type="model", revision=revision,
            operations=[CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in paths],
            commit_message=message or f"Upload {len(paths)} files with alpaca-local",
        )
        remote = {f.path: f.size for f in api.get_paths_info(repo_id, [p.name for p in paths], revision=info.oid)}
    except Exception as exc:  # noqa: BLE001 (translated into one line)
        raise _translate(exc, repo_id, resume) from None
    local = {p.name: p.stat().st_size for p in paths}
    wrong = [n for n, size in local.items() if remote.get(n) != size]
    if wrong:
        raise RuntimeFailure(f"commit {info.oid[:12]} on {repo_id} holds {wrong[0]} with {remote.get(wrong[0])} bytes, "
                             f"not {local[wrong[0]]}; check the repository and push again")
    return UploadResult(repo_id, branch, info.oid, str(info.commit_url), tuple(local.items()), private)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _translate(exc: BaseException, repo_id: str, resume: str) -> Exception:
    """huggingface_hub's exception -> one line saying what happened and what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, UsageError):
        return exc
    cause = exc
    while not isinstance(cause, HfHubHTTPError) and cause.__cause__ is not None:
        cause = cause.__cause__  # "Error while uploading 'x'" wraps the HTTP or network error
    status = _status(cause) if isinstance(cause, HfHubHTTPError) else None
    if status == 401:
        return InputError(f"the Hub refused the token (401) for {repo_id}; set HF_TOKEN to a valid token "
                          "with write access (or run `hf auth login`)")
    if status == 403:
        return InputError(f"the token may not write to {repo_id} (403); use a token of that user or organization "
                          "with write access, or another repository name")
    if status == 404:
        return InputError(f"{repo_id} or its branch was not found (404) and could not be created; check the name")
    if status is not None:
        return RuntimeFailure(f"the Hub answered {status} while uploading to {repo_id}; nothing was committed; {resume}")
    if isinstance(cause, (ConnectionError, TimeoutError, OSError)) or _is_network_error(cause):
        return RuntimeFailure(f"network error while uploading to {repo_id} ({type(cause).__name__}); "
                              f"nothing was committed; {resume}")
    return RuntimeFailure(f"the upload to {repo_id} failed ({type(cause).__name__}: {str(cause)[:120]}); "
                          f"nothing was committed; {resume}")


def _is_network_error(exc: BaseException) -> bool:
    """The transport errors of the HTTP client huggingface_hub uses (requests on 0.x, httpx on 1.x,
    httpx2 on 2.x): source.hub_http knows which, for downloads and uploads alike."""
    from alpaca_local.source.hub_http import hub_client

    client = hub_client()
    return isinstance(exc, client.network_errors + client.body_errors)
