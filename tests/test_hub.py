"""`convert org/name` and `plan org/name` against a fake Hub on 127.0.0.1 (tests/fake_hub.py).

Nothing here reaches the real Hub: huggingface_hub's endpoint, cache and token
file are pointed at the fake server and a temp folder. A streamed convert must
give the same bytes as converting the same folder locally; faults (a dropped
connection, a flipped byte, error statuses) must end in either the same file
or a one-line error with nothing left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

import tinymodels
from fake_hub import TOKEN, FakeHub
from helpers import cli, leftovers, one_line

from alpaca_local.cli.main import main
from alpaca_local.convert import search
from alpaca_local.convert.pipeline import convert
from alpaca_local.convert.quant_levels import LEVELS
from alpaca_local.convert.quant_rules import QUANTS
from alpaca_local.source import hub as hub_mod
from alpaca_local.source import remote
from alpaca_local.source.hub import HubId, parse_hub_id

SHARD1 = "model-00001-of-00002.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tinymodels.TinyLlama]:
    root = tmp_path_factory.mktemp("hub-models")
    return {
        "sharded": tinymodels.build_llama(root / "tiny", shards=2),
        "bf16": tinymodels.build_llama(root / "tiny-bf16", dtype="BF16"),
        "bin": tinymodels.build_llama(root / "tiny-bin", fmt="bin", shards=2),
    }


@pytest.fixture
def hub(models, tmp_path, monkeypatch) -> FakeHub:
    """The fake Hub with me/tiny (2 safetensors shards), me/tiny-bf16, me/tiny-bin (pytorch .bin)."""
    from huggingface_hub import constants

    fake = FakeHub()
    fake.add_repo("me/tiny", models["sharded"].path)
    fake.add_repo("me/tiny-bf16", models["bf16"].path)
    fake.add_repo("me/tiny-bin", models["bin"].path)
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)  # read again at each call (see source/hub.py)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)
    monkeypatch.setattr(remote, "MAX_BACKOFF_S", 0.0)
    yield fake
    fake.close()


def _cached_weights(tmp_path: Path) -> list[str]:
    cache = tmp_path / "hf-cache"
    return sorted(p.name for p in cache.rglob("*") if p.name.endswith((".safetensors", ".bin"))) if cache.exists() else []


def _local(model: tinymodels.TinyLlama, tmp_path: Path, quant: str) -> bytes:
    return convert(model.path, tmp_path / f"local.{quant}.gguf", quant).output.read_bytes()


# -- the happy path ---------------------------------------------------------------------------


def test_parse_hub_id():
    assert parse_hub_id("me/tiny") == HubId("me/tiny", None)
    assert parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct@v1.0") == HubId("Qwen/Qwen2.5-0.5B-Instruct", "v1.0")
    assert parse_hub_id("me/tiny@0123abc").name == "tiny"
    for not_an_id in ("./tiny", "/abs/path", "a/b/c", "tiny", "me/../x", "me/a--b", "me/", "me/x@", ""):
        assert parse_hub_id(not_an_id) is None, not_an_id


# Every level a dense model takes without an importance matrix (the imatrix-only levels and
# MXFP4_MOE are refused before anything is read: tests/test_quant_levels.py).
_PLAIN_LEVELS = [q for q in QUANTS if not LEVELS[q].imatrix and not LEVELS[q].experts_only]


@pytest.mark.parametrize("quant", _PLAIN_LEVELS)
def test_streamed_convert_is_byte_identical_at_every_level(hub, models, tmp_path, capsys, quant):
    out = tmp_path / "out" / "hub.gguf"
    out.parent.mkdir()
    rc, err = cli(capsys, "convert", "me/tiny", "-o", str(out), "-q", quant, "--json")
    assert rc == 0, err
    assert out.read_bytes() == _local(models["sharded"], tmp_path, quant)
    assert _cached_weights(tmp_path) == []  # streamed: only the output was written
    for shard in (SHARD1, "model-00002-of-00002.safetensors"):
        size = len(hub.repos["me/tiny"].files[shard])
        gets = [r for r in hub.log if r[0] == "GET" and r[1].startswith("/lfs/") and hub.blob(r[1][5:])[0] == shard]
        # 8-byte length, the JSON header, then one forward stream to the end of the file
        assert [g[2] for g in gets][-1].endswith(f"-{size - 1}"), gets
        assert len(gets) == 3, gets


def test_a_size_target_streams_and_makes_the_local_file(hub, models, tmp_path, capsys):
    """--target-size from a Hub id: sampled runs of rows by range requests of their own, then the
    usual one forward stream per shard; the file is the one the local folder gives, to the byte."""
    local = tmp_path / "local.gguf"
    rc, err = cli(capsys, "convert", str(models["sharded"].path), "--target-size", "900K", "-o", str(local), "--json")
    assert rc == 0, err
    out = tmp_path / "hub.gguf"
    hub.log.clear()
    rc, err = cli(capsys, "convert", "me/tiny", "--target-size", "900K", "-o", str(out), "--json")
    assert rc == 0, err
    assert "measures sampled rows" in err
    assert out.read_bytes() == local.read_bytes()
    assert _cached_weights(tmp_path) == []  # streamed: nothing in the HF cache
    for shard in (SHARD1, "model-00002-of-00002.safetensors"):
        data = hub.repos["me/tiny"].files[shard]
        n_header = int.from_bytes(data[:8], "little")
        n_tensors = len([k for k in json.loads(data[8:8 + n_header]) if k != "__metadata__"])
        gets = [r[2] for r in hub.log if r[0] == "GET" and r[1].startswith("/lfs/") and hub.blob(r[1][5:])[0] == shard]
        assert gets[:2] == ["bytes=0-7", f"bytes=8-{8 + n_header - 1}"]  # the header, as for any streamed convert
        assert gets[-1] == f"bytes={8 + n_header}-{len(data) - 1}"  # then the data once, in order (hashed)
        sampled = gets[2:-1]
        assert 0 < len(sampled) <= search.SAMPLE_GROUPS * n_tensors, gets  # a range request per run of rows


def test_bf16_streams_too_and_default_name_is_the_repo_name(hub, models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(capsys, "convert", "me/tiny-bf16", "-q", "q8_0", "--json")
    assert rc == 0, err
    assert (tmp_path / "models" / "tiny-bf16.Q8_0.gguf").read_bytes() == _local(models["bf16"], tmp_path, "q8_0")


def test_dropped_connection_mid_tensor_resumes_where_it_stopped(hub, models, tmp_path, capsys):
    data = hub.repos["me/tiny"].files[SHARD1]
    data_start = 8 + int.from_bytes(data[:8], "little")
    hub.faults.drop_after[SHARD1] = 20_001  # bytes into the stream: inside the first tensor's data
    out = tmp_path / "hub.gguf"
    rc, err = cli(capsys, "convert", "me/tiny", "-o", str(out), "-q", "q4_k_m", "--json")
    assert rc == 0, err
    assert not hub.faults.drop_after  # the fault fired
    ranges = [r[2] for r in hub.log if r[0] == "GET" and r[1].startswith("/lfs/") and hub.blob(r[1][5:])[0] == SHARD1]
    assert ranges[-2:] == [f"bytes={data_start}-{len(data) - 1}", f"bytes={data_start + 20_001}-{len(data) - 1}"]
    assert out.read_bytes() == _local(models["sharded"], tmp_path, "q4_k_m")


def test_stalled_connection_times_out_and_resumes(hub, models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(remote, "READ_TIMEOUT_S", 0.5)
    hub.faults.stall_after[SHARD1] = 30_000
    out = tmp_path / "hub.gguf"
    rc, err = cli(capsys, "convert", "me/tiny", "-o", str(out), "-q", "q4_0", "--json")
    assert rc == 0, err
    assert not hub.faults.stall_after  # the fault fired
    data = hub.repos["me/tiny"].files[SHARD1]
    data_start = 8 + int.from_bytes(data[:8], "little")
    ranges = [r[2] for r in hub.log if r[0] == "GET" and r[1].startswith("/lfs/") and hub.blob(r[1][5:])[0] == SHARD1]
    assert ranges[-2:] == [f"bytes={data_start}-{len(data) - 1}", f"bytes={data_start + 30_000}-{len(data) - 1}"], ranges
    assert out.read_bytes() == _local(models["sharded"], tmp_path, "q4_0")


def test_revision_by_commit_and_token_from_the_login_cache(hub, models, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    hub.repos["me/tiny"].private = True
    (tmp_path / "token").write_text(TOKEN)  # what `hf auth login` writes
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    commit = hub.repos["me/tiny"].commit
    out = tmp_path / "hub.gguf"
    rc, err = cli(capsys, "convert", f"me/tiny@{commit}", "-o", str(out), "-q", "q4_0", "--json")
    assert rc == 0, err
    assert out.read_bytes() == _local(models["sharded"], tmp_path, "q4_0")


def test_transient_5xx_answers_are_retried(hub, models, tmp_path, capsys):
    hub.faults.fail_next_files = remote.RETRIES  # one fewer than would give up, for the first request
    out = tmp_path / "hub.gguf"
    rc, err = cli(capsys, "convert", "me/tiny", "-o", str(out), "-q", "q4_0", "--json")
    assert rc == 0, err
    assert hub.faults.fail_next_files == 0
    assert out.read_bytes() == _local(models["sharded"], tmp_path, "q4_0")


def test_bin_repo_converts_via_the_cache(hub, models, tmp_path, capsys):
    out = tmp_path / "hub.gguf"
    rc, err = cli(capsys, "convert", "me/tiny-bin", "-o", str(out), "-q", "q4_0", "--json")
    assert rc == 0, err
    assert out.read_bytes() == _local(models["bin"], tmp_path, "q4_0")
    assert _cached_weights(tmp_path) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]


def test_download_then_offline_from_the_cache(hub, models, tmp_path, capsys):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert cli(capsys, "convert", "me/tiny", "-o", str(first), "-q", "q8_0", "--download", "--json")[0] == 0
    assert _cached_weights(tmp_path) == [SHARD1, "model-00002-of-00002.safetensors"]
    hub.faults.fail_all = 500  # --offline must not ask the server anything
    n_requests = len(hub.log)
    rc, err = cli(capsys, "convert", "me/tiny", "-o", str(second), "-q", "q8_0", "--offline", "--json")
    assert rc == 0, err
    assert len(hub.log) == n_requests
    assert second.read_bytes() == first.read_bytes() == _local(models["sharded"], tmp_path, "q8_0")


def test_cached_weights_are_reused_without_streaming(hub, tmp_path, capsys):
    assert cli(capsys, "convert", "me/tiny", "-o", str(tmp_path / "a.gguf"), "-q", "q4_0", "--download", "--json")[0] == 0
    hub.log.clear()
    assert cli(capsys, "convert", "me/tiny", "-o", str(tmp_path / "b.gguf"), "-q", "q4_0", "--json")[0] == 0
    assert not [r for r in hub.log if r[1].startswith("/lfs/")]


def test_local_path_wins_over_a_hub_id(hub, models, tmp_path, capsys, monkeypatch):
    (tmp_path / "me").mkdir()
    (tmp_path / "me" / "tiny").symlink_to(models["bf16"].path)
    monkeypatch.chdir(tmp_path)
    hub.faults.fail_all = 500
    rc, err = cli(capsys, "convert", "me/tiny", "-o", "x.gguf", "-q", "q4_0", "--json")
    assert rc == 0, err
    assert hub.log == []


# -- transfers that must not corrupt ----------------------------------------------------------


def test_corrupted_byte_is_caught_and_nothing_is_left(hub, tmp_path, capsys):
    data = hub.repos["me/tiny"].files[SHARD1]
    hub.faults.corrupt_at[SHARD1] = len(data) - 3  # in the data, after every header read
    out = tmp_path / "out"
    out.mkdir()
    rc, err = cli(capsys, "convert", "me/tiny", "-o", str(out / "x.gguf"), "--json")
    one_line(rc, err, 1, SHARD1, "sha256", "nothing was written")
    assert leftovers(out) == []


def test_corrupted_download_is_removed_from_the_cache(hub, tmp_path, capsys):
    hub.faults.corrupt_at["pytorch_model-00002-of-00002.bin"] = 100
    out = tmp_path / "out"
    out.mkdir()
    rc, err = cli(capsys, "convert", "me/tiny-bin", "-o", str(out / "x.gguf"), "--json")
    one_line(rc, err, 1, "pytorch_model-00002-of-00002.bin", "does not match", "removed from the cache")
    assert leftovers(out) == []
    assert "pytorch_model-00002-of-00002.bin" not in _cached_weights(tmp_path)


def test_bad_header_is_refused_as_for_a_local_file(hub, tmp_path, capsys, models):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        (folder / name).write_bytes((models["bf16"].path / name).read_bytes())
    (folder / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    hub.add_repo("me/bad", folder)
    rc, err = cli(capsys, "convert", "me/bad", "-o", str(tmp_path / "x.gguf"))
    one_line(rc, err, 1, "model.safetensors", "header claims")


@pytest.mark.parametrize(
    "setup, arg, needles",
    [
        (lambda h: setattr(h.repos["me/tiny"], "private", True), "me/tiny", ("me/tiny", "private", "HF_TOKEN")),
        (lambda h: setattr(h.repos["me/tiny"], "gated", True), "me/tiny", ("gated", "accept", "HF_TOKEN")),
        (lambda h: None, "me/nothing-here", ("me/nothing-here", "no such model")),
        (lambda h: None, "me/tiny@v9", ("no revision 'v9'",)),
        (lambda h: setattr(h.faults, "fail_all", 500), "me/tiny", ("HTTP 500", "try again")),
        (lambda h: setattr(h.faults, "fail_files", 500), "me/tiny", ("kept failing", "HTTP 500", "nothing was written")),
        (lambda h: setattr(h.faults, "fail_files", 403), "me/tiny", ("HTTP 403", "HF_TOKEN")),
    ],
    ids=["private-401", "gated-403", "no-repo", "no-revision", "500-forever", "file-host-500", "file-host-403"],
)
def test_hub_errors_are_one_line_and_leave_nothing(hub, tmp_path, capsys, setup, arg, needles):
    setup(hub)
    out = tmp_path / "out"
    out.mkdir()
    rc, err = cli(capsys, "convert", arg, "-o", str(out / "x.gguf"))
    one_line(rc, err, 1, *needles)
    assert leftovers(out) == []


@pytest.mark.parametrize("download", [False, True], ids=["streamed", "downloaded"])
def test_token_opens_a_private_repo_and_stays_on_the_hub(hub, tmp_path, capsys, monkeypatch, download):
    """The token goes to the endpoint, never across the redirect to the file host (which, like
    a signed-URL store, refuses a request that carries one)."""
    hub.repos["me/tiny"].private = True
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    argv = ["convert", "me/tiny", "-o", str(tmp_path / "x.gguf"), "-q", "q4_0", "--json"] + ["--download"] * download
    rc, err = cli(capsys, *argv)
    assert rc == 0, err
    assert [r for r in hub.log if r[1].startswith("/lfs/")], "nothing came from the file host"
    assert {host for host, _ in hub.authorized} == {"api"}, hub.authorized


def test_no_network_says_so(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    rc, err = cli(capsys, "convert", "me/tiny", "-o", str(tmp_path / "x.gguf"))
    one_line(rc, err, 1, "cannot reach http://127.0.0.1:9", "--offline")


def test_offline_without_the_weights_in_the_cache(hub, tmp_path, capsys):
    assert cli(capsys, "convert", "me/tiny", "-o", str(tmp_path / "a.gguf"), "-q", "q4_0", "--json")[0] == 0
    rc, err = cli(capsys, "convert", "me/tiny", "-o", str(tmp_path / "b.gguf"), "--offline")
    one_line(rc, err, 1, "not its weights", "--download")
    rc, err = cli(capsys, "convert", "me/other", "-o", str(tmp_path / "b.gguf"), "--offline")
    one_line(rc, err, 1, "me/other is not in the Hugging Face cache")


@pytest.mark.filterwarnings("ignore:Not enough free disk space")  # huggingface_hub sees the patched disk too
def test_download_checks_the_disk_before_starting(hub, tmp_path, capsys, monkeypatch):
    class Usage:
        free = 1000

    monkeypatch.setattr(hub_mod.shutil, "disk_usage", lambda path: Usage)
    rc, err = cli(capsys, "convert", "me/tiny", "-o", str(tmp_path / "x.gguf"), "--download")
    one_line(rc, err, 1, "not enough disk space to download", "GB free", "leave out --download to stream")
    rc, err = cli(capsys, "convert", "me/tiny-bin", "-o", str(tmp_path / "x.gguf"))  # .bin: always downloaded
    assert "to stream" not in one_line(rc, err, 1, "not enough disk space to download")
    assert not [r for r in hub.log if r[1].startswith("/lfs/")]


# -- plan -------------------------------------------------------------------------------------


def test_plan_reads_only_headers(hub, models, tmp_path, capsys):
    assert main(["plan", "me/tiny", "--vram", "8", "--json"]) == 0
    remote_plan = json.loads(capsys.readouterr().out)
    assert main(["plan", str(models["sharded"].path), "--vram", "8", "--json"]) == 0
    local_plan = json.loads(capsys.readouterr().out)
    assert remote_plan["model"]["name"] == "tiny"
    assert remote_plan["levels"] == local_plan["levels"]
    fetched = [r for r in hub.log if r[1].startswith("/lfs/")]
    assert fetched and all(not r[2].endswith(f"-{len(hub.blob(r[1][5:])[1]) - 1}") for r in fetched)
    assert _cached_weights(tmp_path) == []


def test_plan_of_a_bin_repo_fetches_no_weights(hub, tmp_path, capsys):
    assert main(["plan", "me/tiny-bin", "--vram", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["n_layer"] == 2
    assert not [r for r in hub.log if r[1].startswith("/lfs/")]


# -- the real route: environment variables read at import, a fresh process ---------------------


def test_cli_process_honours_hf_endpoint_and_hf_hub_offline(hub, models, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf-home"), ALPACA_LOCAL_HUB_BACKOFF="0",
               NO_PROXY="127.0.0.1,127.0.0.2", HF_HUB_DISABLE_TELEMETRY="1")

    def run(*argv: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "alpaca_local", *argv], env={**env, **extra},
                              capture_output=True, text=True, timeout=300)

    a = run("convert", "me/tiny", "-o", str(tmp_path / "a.gguf"), "-q", "q4_0", "--download", "--json")
    assert a.returncode == 0, a.stderr
    hub.faults.fail_all = 500
    b = run("convert", "me/tiny", "-o", str(tmp_path / "b.gguf"), "-q", "q4_0", "--json", HF_HUB_OFFLINE="1")
    assert b.returncode == 0, b.stderr
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes() == _local(
        models["sharded"], tmp_path, "q4_0"
    )


# -- the resolver as a library call (what --lora/--base use) ------------------------------------


def test_adapter_repo_is_downloaded_checked_and_then_offline(hub, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from alpaca_local.source.hub import HubSource, resolve_source

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": np.ones((4, 8), np.float32)},
              str(folder / "adapter_model.safetensors"))
    hub.add_repo("me/lora", folder)
    src = resolve_source("me/lora")
    assert isinstance(src, HubSource) and not src.stream
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (src.folder / name).read_bytes() == (folder / name).read_bytes()
    hub.faults.fail_all = 500
    again = resolve_source("me/lora", offline=True)
    assert again.folder == src.folder


def test_resolver_returns_an_existing_path_untouched(hub, tmp_path):
    from alpaca_local.source.hub import resolve_source

    assert resolve_source(tmp_path) == tmp_path
    assert resolve_source("./no/such") == Path("./no/such")  # not a Hub id: the caller reports it
    assert hub.log == []


def test_json_summary_names_the_commit_and_the_bytes_fetched(hub, tmp_path, capsys):
    assert main(["convert", "me/tiny", "-o", str(tmp_path / "x.gguf"), "-q", "q4_0", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["hub"]
    assert info["repo"] == "me/tiny" and info["commit"] == hub.repos["me/tiny"].commit and info["streamed"]
    assert info["fetched_bytes"] == hub.lfs_bytes("me/tiny")  # every byte once: headers + one stream per file


def test_summary_table_names_the_source(hub, tmp_path, capsys):
    assert main(["convert", "me/tiny@main", "-o", str(tmp_path / "x.gguf"), "-q", "q4_0"]) == 0
    out = capsys.readouterr().out
    assert f"me/tiny @ {hub.repos['me/tiny'].commit[:12]} (streamed" in out


def test_server_failing_mid_stream_leaves_nothing(hub, tmp_path):
    from alpaca_local.cli.convert_cmd import open_source
    from alpaca_local.errors import RuntimeFailure

    plan, src = open_source("me/tiny", "q4_0")  # headers read; the data is not yet
    hub.faults.fail_files = 500
    with pytest.raises(RuntimeFailure, match="kept failing"):
        convert(plan.source, tmp_path / "x.gguf", "q4_0", plan=plan, check_source=src.verify)
    src.close()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("good", [True, False])
def test_remote_file_checks_a_git_sha1(hub, good):
    import hashlib

    from alpaca_local.errors import InputError
    from alpaca_local.source.hub_http import hub_client
    from alpaca_local.source.remote import Checksum, RemoteFile

    data = hub.repos["me/tiny"].files[SHARD1]
    sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() if good else "0" * 40
    url = f"{hub.endpoint}/me/tiny/resolve/main/{SHARD1}"
    f = RemoteFile(url, SHARD1, Checksum(len(data), git_sha1=sha1), {}, hub_client())
    assert f.read_at(100, 50) == data[100:150]
    with pytest.raises(RuntimeError, match="reads must go forward"):
        f.read_at(10, 5)
    if good:
        f.finish()
    else:
        with pytest.raises(InputError, match="git sha1"):
            f.finish()


def test_plan_offline_from_the_cache(hub, tmp_path, capsys, monkeypatch):
    assert cli(capsys, "convert", "me/tiny", "-o", str(tmp_path / "a.gguf"), "-q", "q4_0", "--download", "--json")[0] == 0
    hub.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "me/tiny", "--vram", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["name"] == "tiny"
    assert hub.log == []


@pytest.mark.reference
def test_lora_and_base_take_hub_ids(hub, models, tmp_path, capsys):
    """`--lora` and `--base` accept Hub ids as they accept folders (issue 15), with the same bytes."""
    import peft_adapters as pa

    base = models["sharded"].path
    adapter = pa.make_adapter(base, tmp_path / "my-lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    hub.add_repo("me/my-lora", adapter)
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()  # PEFT's own warnings
    for src, lora, name in (("me/tiny", "me/my-lora", "hub"), (str(base), str(adapter), "local")):
        rc, err = cli(capsys, "convert", src, "--lora", lora, "-q", "q8_0", "-o", str(out / f"{name}.gguf"), "--json")
        assert rc == 0, err
    assert (out / "hub.gguf").read_bytes() == (out / "local.gguf").read_bytes()
    for src, base_arg, name in (("me/my-lora", "me/tiny", "hub-adapter"), (str(adapter), str(base), "local-adapter")):
        rc, err = cli(capsys, "convert", src, "--base", base_arg, "-o", str(out / f"{name}.gguf"), "--json")
        assert rc == 0, err
    hub_kv, local_kv = (gguf.GGUFReader(out / f"{n}.gguf") for n in ("hub-adapter", "local-adapter"))
    assert [(t.name, bytes(t.data)) for t in hub_kv.tensors] == [(t.name, bytes(t.data)) for t in local_kv.tensors]


def test_hub_http_read1_returns_what_arrived_and_a_stall_times_out():
    """source/hub_http on whichever huggingface_hub is installed (`make compat` runs the oldest
    and the newest): the bytes sent before a stall come back at once, then the read timeout
    raises one of `body_errors`, so RemoteFile resumes at the exact byte."""
    import socket
    import threading
    import time

    from alpaca_local.source.hub_http import hub_client

    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        done.wait(10)  # then silence until the test is over
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    client = hub_client()
    resp = client.open(f"http://127.0.0.1:{server.getsockname()[1]}/f", {"Range": "bytes=0-99999"}, 5.0, 0.5)
    try:
        assert resp.status_code == 206 and resp.headers.get("content-length") == "100000"
        got = b""
        while len(got) < 1000:
            got += resp.read1(100_000)
        assert got == b"x" * 1000
        start = time.monotonic()
        with pytest.raises(client.body_errors):
            resp.read1(100_000)
        assert time.monotonic() - start < 5  # the 0.5 s read timeout, not the server giving up
    finally:
        done.set()
        resp.close()
        server.close()
