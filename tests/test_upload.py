"""`alpaca-local upload` and `convert --push` against a fake Hub on 127.0.0.1 (tests/fake_hub_upload.py).

The pushed files must be byte-equal to the folder's, in one commit; every error (no token,
a bad or read-only token, no rights, a Hub 500, a connection dropped for good mid-upload)
must be one line with the repository unchanged, and running again must resume without
sending what was already uploaded. huggingface_hub's own upload API does the work, so
these tests also pin what it asks of the Hub.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import huggingface_hub
import pytest

import tinymodels
from fake_hub_upload import READ_TOKEN, WRITE_TOKEN, UploadHub
from helpers import cli, one_line

from alpaca_local.cli.main import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """What `convert --quant q8_0,q4_0` writes: two levels and the card."""
    work = tmp_path_factory.mktemp("upload")
    model = tinymodels.build_llama(work / "tiny").path
    out = work / "tiny-GGUF"
    assert main(["convert", str(model), "--quant", "q8_0,q4_0", "-o", str(out), "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def model(folder) -> Path:
    return folder.parent / "tiny"


# How the client picks Xet for an upload (hf_xet installed): 0.34/0.35 ask the repo's info
# (xetEnabled; this fake Hub says no), 0.36-1.x offer "xet" in the LFS batch request and the
# Hub picks (this one answers "basic"), 2.x sends every LFS file by Xet to a CAS server with no
# LFS fallback. This fake Hub speaks LFS only, so on 2.x its HF_HUB_DISABLE_XET path is driven.
_HUB_VERSION = tuple(int(x) for x in huggingface_hub.__version__.split(".")[:2])
XET_ONLY_CLIENT = _HUB_VERSION >= (2, 0)
XET_OFFERED_IN_BATCH = (0, 36) <= _HUB_VERSION < (2, 0)


def _hub(monkeypatch, token: str | None = WRITE_TOKEN, **kw) -> UploadHub:
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hub = UploadHub(**kw)
    if XET_ONLY_CLIENT:
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    # huggingface_hub read HF_ENDPOINT at import and parses commit URLs against it (CommitInfo -> RepoUrl)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", "/nonexistent/stored_tokens", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)

    class _NoWait:  # huggingface_hub retries a dropped upload after 1, 2, 4, 8, 8 s: not in tests
        sleep = staticmethod(lambda seconds: None)

        def __getattr__(self, name):
            import time

            return getattr(time, name)

    monkeypatch.setattr(_http, "time", _NoWait())
    return hub


@pytest.fixture
def hub(monkeypatch):
    fake = _hub(monkeypatch)
    yield fake
    fake.close()


def _local(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def _upload(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # what came before (a fixture's convert) is not this command's output
    rc = main(["upload", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_upload_pushes_the_folder_in_one_commit(hub, folder, capsys):
    rc, out, err = _upload(capsys, str(folder), "me/tiny-GGUF", "--json")
    assert rc == 0, err
    assert hub.files("me/tiny-GGUF") == _local(folder)  # byte for byte
    assert len(hub.commits("me/tiny-GGUF")) == 2  # the initial one, then ours
    summary = json.loads(out)
    assert summary["commit"] == hub.commits("me/tiny-GGUF")[-1].oid
    assert sorted(f["name"] for f in summary["files"]) == sorted(_local(folder))
    assert not hub.repos["me/tiny-GGUF"].private
    assert any(c.startswith("---\n") for c in hub.validated)  # the card's front matter went through validate-yaml


def test_private_and_a_branch(hub, folder, capsys):
    rc, _, err = _upload(capsys, str(folder), "my-org/tiny-GGUF", "--private", "--revision", "v1", "--json")
    assert rc == 0, err
    repo = hub.repos["my-org/tiny-GGUF"]
    assert repo.private
    assert hub.files("my-org/tiny-GGUF", "v1") == _local(folder)
    assert hub.files("my-org/tiny-GGUF", "main") == {}  # main untouched


def test_large_files_go_multipart(monkeypatch, folder, capsys):
    hub = _hub(monkeypatch, multipart_chunk=500_000)
    try:
        rc, _, err = _upload(capsys, str(folder), "me/tiny-GGUF", "--json")
        assert rc == 0, err
        assert hub.files("me/tiny-GGUF") == _local(folder)
        assert any(path.count("/") == 3 for method, path in hub.log if method == "PUT")  # /upload/{oid}/{part}
    finally:
        hub.close()


# Xet offered and refused is a 0.x/1.x conversation; a 2.x client does not ask (XET_ONLY_CLIENT).
@pytest.mark.parametrize("disable_xet", [True] if XET_ONLY_CLIENT else [False, True])
def test_with_and_without_xet(monkeypatch, folder, capsys, disable_xet):
    """hf_xet installed: huggingface_hub offers Xet and the Hub picks; this Hub answers "basic" (LFS) as a
    Hub does for a repository without Xet. HF_HUB_DISABLE_XET=1: Xet is not offered. Same files either way."""
    from huggingface_hub import constants

    pytest.importorskip("hf_xet")
    hub = _hub(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", disable_xet)
    try:
        rc, _, err = _upload(capsys, str(folder), "me/tiny-GGUF", "--json")
        assert rc == 0, err
        offered = XET_OFFERED_IN_BATCH and not disable_xet
        assert hub.batch_transfers and all(("xet" in t) == offered for t in hub.batch_transfers)
        assert hub.files("me/tiny-GGUF") == _local(folder)
    finally:
        hub.close()


def test_a_second_push_sends_nothing_again(hub, folder, capsys):
    assert _upload(capsys, str(folder), "me/tiny-GGUF", "--json")[0] == 0
    sent = hub.put_bytes
    assert _upload(capsys, str(folder), "me/tiny-GGUF", "--json")[0] == 0
    assert hub.put_bytes == sent  # the Hub holds every object: no byte uploaded twice
    assert len(hub.commits("me/tiny-GGUF")) == 2  # unchanged files: no empty commit


# -- errors: one line, the repository unchanged ----------------------------------------------


def test_no_token(monkeypatch, folder, capsys):
    hub = _hub(monkeypatch, token=None)
    try:
        rc, _, err = _upload(capsys, str(folder), "me/tiny-GGUF")
        one_line(rc, err, 1, "no Hugging Face token", "HF_TOKEN")
        assert hub.log == [] and hub.repos == {}
    finally:
        hub.close()


@pytest.mark.parametrize("token, repo, needle", [
    ("hf_not_a_token", "me/tiny-GGUF", "refused the token (401)"),
    (READ_TOKEN, "me/tiny-GGUF", "read-only"),
    (WRITE_TOKEN, "someone-else/tiny-GGUF", "may not write to someone-else/tiny-GGUF (403)"),
])
def test_bad_tokens_and_rights(monkeypatch, folder, capsys, token, repo, needle):
    hub = _hub(monkeypatch, token=token)
    try:
        rc, _, err = _upload(capsys, str(folder), repo)
        one_line(rc, err, 1, needle)
        assert hub.repos == {} and hub.put_bytes == 0
    finally:
        hub.close()


def test_hub_500_on_commit_leaves_the_repo_unchanged_and_resumes(hub, folder, capsys):
    hub.faults.status["commit"] = [500, 1]
    rc, _, err = _upload(capsys, str(folder), "me/tiny-GGUF")
    one_line(rc, err, 1, "answered 500", "nothing was committed", "run the same command again")
    assert hub.files("me/tiny-GGUF") == {} and len(hub.commits("me/tiny-GGUF")) == 1
    sent = hub.put_bytes
    assert sent == sum(len(v) for k, v in _local(folder).items() if k.endswith(".gguf"))
    rc, _, err = _upload(capsys, str(folder), "me/tiny-GGUF", "--json")
    assert rc == 0, err
    assert hub.put_bytes == sent  # resumed: the LFS bytes already on the Hub were not sent again
    assert hub.files("me/tiny-GGUF") == _local(folder)


def test_a_dropped_upload_is_retried(hub, folder, capsys):
    data = (folder / "tiny.Q8_0.gguf").read_bytes()
    hub.faults.drop_upload[hashlib.sha256(data).hexdigest()] = [len(data) // 2, 1]
    rc, _, err = _upload(capsys, str(folder), "me/tiny-GGUF", "--json")
    assert rc == 0, err
    assert hub.files("me/tiny-GGUF") == _local(folder)


def test_a_connection_that_keeps_dropping_is_one_line_and_resumable(hub, folder, capsys):
    data = (folder / "tiny.Q8_0.gguf").read_bytes()
    hub.faults.drop_upload[hashlib.sha256(data).hexdigest()] = [1000, 100]
    rc, _, err = _upload(capsys, str(folder), "me/tiny-GGUF")
    one_line(rc, err, 1, "network error", "nothing was committed")
    assert hub.files("me/tiny-GGUF") == {}
    hub.faults.drop_upload.clear()
    other = (folder / "tiny.Q4_0.gguf").read_bytes()
    assert hashlib.sha256(other).hexdigest() in hub.lfs  # the other level did arrive before the failure
    sent = hub.put_bytes
    assert _upload(capsys, str(folder), "me/tiny-GGUF", "--json")[0] == 0
    assert hub.put_bytes - sent == len(data)  # only the missing file is sent
    assert hub.files("me/tiny-GGUF") == _local(folder)


@pytest.mark.parametrize("argv, code, needle", [
    (["upload", "{folder}", "not-an-id"], 2, "not a Hub repository id"),
    (["upload", "{folder}/nope", "me/x"], 1, "is not a folder"),
    (["upload", "{empty}", "me/x"], 1, "holds no files"),
])
def test_usage_and_input_errors(hub, folder, tmp_path, capsys, argv, code, needle):
    (tmp_path / "empty").mkdir()
    argv = [a.format(folder=folder, empty=tmp_path / "empty") for a in argv]
    rc, err = cli(capsys, *argv)
    one_line(rc, err, code, needle)
    assert hub.log == []


def test_a_symlink_in_the_folder_is_refused(hub, folder, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (copy / "notes.txt").symlink_to(secret)
    rc, err = cli(capsys, "upload", str(copy), "me/tiny-GGUF")
    one_line(rc, err, 1, "notes.txt", "not a regular file")
    assert hub.repos == {}


# -- convert --push --------------------------------------------------------------------------


def test_convert_push(hub, model, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "out").mkdir()
    (out / "old-notes.txt").write_text("an unrelated file in the folder")
    rc = main(["convert", str(model), "--quant", "q8_0,q4_k_m", "-o", str(out), "--push", "me/tiny-GGUF",
               "--private", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    pushed = hub.files("me/tiny-GGUF")
    assert sorted(pushed) == ["README.md", "tiny.Q4_K_M.gguf", "tiny.Q8_0.gguf"]  # this run's files only
    assert all(pushed[name] == (out / name).read_bytes() for name in pushed)
    assert hub.repos["me/tiny-GGUF"].private
    assert json.loads(captured.out)["pushed"]["commit"] == hub.commits("me/tiny-GGUF")[-1].oid


def test_convert_push_checks_the_token_before_converting(monkeypatch, model, tmp_path, capsys):
    hub = _hub(monkeypatch, token=READ_TOKEN)
    try:
        rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,q4_0", "-o", str(tmp_path / "out"),
                      "--push", "me/tiny-GGUF")
        one_line(rc, err, 1, "read-only")
        assert not (tmp_path / "out").exists()  # nothing converted
    finally:
        hub.close()


def test_convert_push_failure_keeps_the_files_and_says_how_to_push(hub, model, tmp_path, capsys):
    hub.faults.status["commit"] = [500, 1]
    out = tmp_path / "out"
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,q4_0", "-o", str(out), "--push", "me/tiny-GGUF")
    line = one_line(rc, err, 1, "nothing was committed", f"alpaca-local upload {out} me/tiny-GGUF")
    assert "answered 500" in line
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "tiny.Q4_0.gguf", "tiny.Q8_0.gguf"]
    rc, _, err = _upload(capsys, str(out), "me/tiny-GGUF", "--json")
    assert rc == 0, err
    assert hub.files("me/tiny-GGUF") == _local(out)


def test_push_flags_need_push(model, tmp_path, capsys):
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,q4_0", "--private")
    one_line(rc, err, 2, "--push")
