"""`org/name[@revision]` → a model source: a local folder or Hub files read remotely.

In: what the user typed where a model folder is accepted. Out, from
`resolve_source`: the same `Path` when it exists on disk (a local path always
wins), else a `HubSource` whose `folder` (a snapshot in the standard Hugging
Face cache) holds the small files (config, tokenizer, shard index) and whose
`weights()` gives every tensor as a `TensorRef`, either read from the cache or
streamed from the Hub with range requests (`source.remote`).

huggingface_hub does what it does well: token (HF_TOKEN or the login cache),
HF_ENDPOINT, HF_HUB_OFFLINE, the cache layout, revisions, resumable downloads.
Weights stream by default; `download=True` puts them in the cache instead, and
pytorch .bin repositories are always downloaded (their pickles are read by the
restricted unpickler from a local file). Every weight file is checked against
the size and hash the Hub lists, whichever way it arrived.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_local.errors import InputError, RuntimeFailure
from alpaca_local.source import hub_http, remote
from alpaca_local.source.remote import Checksum, RemoteFile
from alpaca_local.source.safetensors_io import parse_header, read_header_bytes
from alpaca_local.source.tensors import TensorRef
from alpaca_local.source.weights import FORMATS, merge_shards, read_index, read_weights

# The files the readers in this package open besides the weights (config.py, vocab.py,
# architectures.py); all small, all fetched with hf_hub_download.
SMALL_FILES = (
    "config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",
)
# The Hub's rules for a repo id: "name" or "org/name", letters, digits, "-", "_", ".", at most 96
# characters, no "--" or ".." (huggingface_hub.utils._validators.REPO_ID_REGEX).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<rev>[^\s@]+))?$")

NO_NETWORK_RETRIES = 2

# A PEFT adapter repository has these instead of config.json (peft's CONFIG_NAME,
# SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME); adapters are small, so they are always downloaded.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")



@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None  # None: the default branch

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1]


def parse_hub_id(arg: str) -> HubId | None:
    """`org/name` or `org/name@revision`, or None when `arg` cannot be a Hub id."""
    m = _HUB_ID.match(arg)
    if not m or "--" in m["repo"] or ".." in m["repo"] or m["repo"].endswith((".", "-")):
        return None
    return HubId(m["repo"], m["rev"])


@dataclass
class HubSource:
    """A Hub model: small files in `folder`; weights from the cache or streamed."""

    hub_id: HubId
    commit: str
    folder: Path
    files: dict[str, Checksum] = field(default_factory=dict)  # weight file -> what the Hub lists
    stream: bool = False  # False: the weights are in `folder` (cache), if `has_weights`
    has_weights: bool = True  # False only for `resolve_source(..., metadata_only=True)` of a .bin repo
    endpoint: str = ""
    token: str | bool | None = None
    _remote: dict[str, RemoteFile] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.hub_id.name

    @property
    def bytes_fetched(self) -> int:
        return sum(f.bytes_fetched for f in self._remote.values())

    def weights(self) -> dict[str, TensorRef]:
        """Every source tensor; streamed sources read only the safetensors headers here."""
        if not self.stream:
            return read_weights(self.folder)
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        headers, client = build_hf_headers(token=self.token), hub_http.hub_client()

        def read_header(filename: str) -> dict[str, TensorRef]:
            url = hf_hub_url(self.hub_id.repo_id, filename, revision=self.commit, endpoint=self.endpoint)
            f = RemoteFile(url, f"{self.hub_id}/{filename}", self.files[filename], headers, client)
            self._remote[filename] = f
            shown, size = Path(self.hub_id.repo_id) / filename, self.files[filename].size
            raw = read_header_bytes(shown, size, f.fetch)
            f.start_with(raw)  # the final hash covers the header bytes we parsed
            return parse_header(shown, raw, size, f)

        index = _weights_index(self.folder)
        if index is None:
            (single,) = self.files
            return read_header(single)
        return merge_shards(index[0], index[1], ((name, read_header(name)) for name in self.files))

    def verify(self) -> None:
        """Finish every streamed file and check its size and hash (raises on a mismatch)."""
        for f in self._remote.values():
            f.finish()

    def close(self) -> None:
        for f in self._remote.values():
            f.close()


def resolve_source(
    arg: str | Path,
    *,
    download: bool = False,
    offline: bool = False,
    endpoint: str | None = None,
    token: str | bool | None = None,
    metadata_only: bool = False,
) -> Path | HubSource:
    """What `convert`/`plan` (and `--lora`/`--base`) were given: a local folder or a Hub model.

    A PEFT adapter repository (adapter_config.json, no config.json) is always downloaded:
    its `folder` then holds adapter_config.json and adapter_model.safetensors (or .bin).

    `metadata_only` (for `plan`): never download weights; a .bin repository then comes
    back with `has_weights` False, a safetensors one streams (headers only are read).
    """
    path = Path(arg)
    hub_id = None if path.exists() else parse_hub_id(str(arg))
    if hub_id is None:
        return path  # the caller's own checks say what is wrong with a missing path
    from huggingface_hub import constants

    # huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import; reading them
    # again here lets a program that sets them later (or a test) be heard too.
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if offline or constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return _from_cache(hub_id, endpoint)
    with hub_errors(hub_id, endpoint):
        return _from_hub(hub_id, endpoint, token, download, metadata_only)


def _from_cache(hub_id: HubId, endpoint: str) -> HubSource:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id.repo_id, "config.json", revision=hub_id.revision)
    if not isinstance(found, str):
        found = try_to_load_from_cache(hub_id.repo_id, ADAPTER_CONFIG, revision=hub_id.revision)
    if not isinstance(found, str):
        raise InputError(
            f"{hub_id} is not in the Hugging Face cache; run once without --offline "
            "(or unset HF_HUB_OFFLINE) to fetch it"
        )
    folder = Path(found).parent
    if not _weights_present(folder):
        raise InputError(
            f"the cache has {hub_id}'s config but not its weights; run once online with --download to keep them"
        )
    return HubSource(hub_id, folder.name, folder, endpoint=endpoint)


def _weights_present(folder: Path) -> bool:
    """Whether a cache snapshot holds complete weights (every shard its index names)."""
    if not (folder / "config.json").is_file():
        return any((folder / name).is_file() for name in ADAPTER_WEIGHTS)
    for single, index, _, _ in FORMATS:
        if (folder / index).is_file():
            return all((folder / shard).is_file() for shard in read_index(folder / index).values())
        if (folder / single).is_file():
            return True
    return False


def _from_hub(
    hub_id: HubId, endpoint: str, token: str | bool | None, download: bool, metadata_only: bool,
) -> HubSource:
    from huggingface_hub import HfApi

    info = _retrying(lambda: HfApi(endpoint=endpoint, token=token).model_info(
        hub_id.repo_id, revision=hub_id.revision, files_metadata=True
    ))
    listed = {s.rfilename: s for s in info.siblings or ()}
    if "config.json" not in listed and ADAPTER_CONFIG in listed:
        return _adapter_from_hub(hub_id, info, listed, endpoint, token)
    if "config.json" not in listed:
        raise InputError(f"{hub_id} has no config.json; it is not a Transformers model repository")
    folder, commit = _first_file(hub_id, "config.json", info.sha, endpoint, token)
    for name in SMALL_FILES[1:]:
        if name in listed:
            _hf_download(hub_id, name, commit, endpoint, token)
    weight_files, is_safetensors = _weight_files(hub_id, folder, listed, commit, endpoint, token)
    files = {name: _checksum(listed[name]) for name in weight_files}
    src = HubSource(hub_id, commit, folder, files, endpoint=endpoint, token=token)
    if all(_in_cache(folder / name, files[name]) for name in weight_files):
        return src  # in the cache already (an earlier --download, or another tool)
    if is_safetensors and (not download or metadata_only):
        src.stream = True
        return src
    if metadata_only:
        src.has_weights = False
        return src
    _download_weights(src, token)
    return src


def _first_file(hub_id: HubId, name: str, sha: str | None, endpoint: str, token) -> tuple[Path, str]:
    """Download `name` by the revision asked for: (snapshot folder, commit).

    This first download records the revision -> commit link in the cache (for
    --offline later); every other file is then fetched by that commit, so all
    come from one commit even if the branch moves meanwhile.
    """
    folder = Path(_hf_download(hub_id, name, hub_id.revision, endpoint, token)).parent
    if sha and folder.name != sha:
        raise RuntimeFailure(f"{hub_id} changed while it was being read (commit {sha[:12]}, then {folder.name[:12]}); try again")
    return folder, folder.name


def _adapter_from_hub(hub_id: HubId, info, listed: dict, endpoint: str, token) -> HubSource:
    """A PEFT adapter repository: adapter_config.json and its weights, downloaded and checked."""
    weights = [name for name in ADAPTER_WEIGHTS if name in listed][:1]
    if not weights:
        raise InputError(f"{hub_id} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}; the adapter is incomplete")
    folder, commit = _first_file(hub_id, ADAPTER_CONFIG, info.sha, endpoint, token)
    src = HubSource(hub_id, commit, folder, {weights[0]: _checksum(listed[weights[0]])}, endpoint=endpoint, token=token)
    if not (folder / weights[0]).is_file():
        _download_weights(src, token)
    return src


def _in_cache(path: Path, checksum: Checksum) -> bool:
    """A complete cache entry for this content: the right size, and (LFS files) the blob the
    cache names by its sha256, so a file from another revision or a cut-off copy is not used."""
    try:
        return path.stat().st_size == checksum.size and (
            not checksum.sha256 or path.resolve().name == checksum.sha256
        )
    except OSError:
        return False


def _weight_files(hub_id: HubId, folder: Path, listed: dict, commit: str, endpoint: str, token) -> tuple[list[str], bool]:
    """The weight files to read (the shards an index names, or the single file), and whether safetensors."""
    for single, index, _, _ in FORMATS:
        if index in listed:
            _hf_download(hub_id, index, commit, endpoint, token)
            shards = sorted(set(read_index(folder / index).values()))
            absent = [s for s in shards if s not in listed]
            if absent:
                raise InputError(f"shard {absent[0]} named in {index} is not in {hub_id}; the repository is incomplete")
            return shards, single.endswith(".safetensors")
        if single in listed:
            return [single], single.endswith(".safetensors")
    raise InputError(
        f"no weights in {hub_id}: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _checksum(sibling) -> Checksum:
    lfs = sibling.lfs
    if lfs is not None:
        return Checksum(int(lfs.size), sha256=lfs.sha256)
    if sibling.size is None:
        raise InputError(f"the Hub lists no size for {sibling.rfilename}; cannot check it")
    return Checksum(int(sibling.size), git_sha1=sibling.blob_id)


def _download_weights(src: HubSource, token: str | bool | None) -> None:
    """hf_hub_download each weight file into the cache (resumable), after checking the disk."""
    from huggingface_hub import constants

    need = sum(c.size for name, c in src.files.items() if not (src.folder / name).is_file())
    check_cache_space(Path(constants.HF_HUB_CACHE), need, can_stream=all(n.endswith(".safetensors") for n in src.files))
    for name, checksum in src.files.items():
        path = Path(_hf_download(src.hub_id, name, src.commit, src.endpoint, token))
        check_file(path, checksum, f"{src.hub_id}/{name}")


def check_cache_space(cache: Path, need: int, can_stream: bool = True) -> None:
    """Refuse `--download` before it starts when the cache's disk cannot hold the files."""
    existing = cache
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need > free:
        raise RuntimeFailure(
            f"not enough disk space to download into {cache}: the weights need {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free; free some space or set HF_HUB_CACHE to a bigger disk"
            + (", or leave out --download to stream" if can_stream else "")
        )


def check_file(path: Path, checksum: Checksum, shown: str) -> None:
    """A downloaded file against the Hub's size and hash; a bad file is removed from the cache."""
    size = path.stat().st_size
    h = checksum.hasher()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            h.update(piece)
    if size != checksum.size or (checksum.expected and h.hexdigest() != checksum.expected):
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise InputError(
            f"{shown}: the downloaded file ({size} bytes) does not match the Hub's size and hash; "
            "it was removed from the cache, try again"
        )


def _hf_download(hub_id: HubId, filename: str, revision: str | None, endpoint: str, token) -> str:
    """One file into the cache; huggingface_hub retries 5xx and dropped connections itself
    (utils/_http.py http_backoff) and resumes a partial download."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(hub_id.repo_id, filename, revision=revision, endpoint=endpoint, token=token)


def _retrying(call):
    """`call()`, again after a pause when the Hub answers 5xx or the connection fails
    (HfApi's calls, unlike downloads, are not retried by huggingface_hub)."""
    from huggingface_hub.errors import HfHubHTTPError

    client = hub_http.hub_client()
    for attempt in range(remote.RETRIES + 1):
        try:
            return call()
        except (HfHubHTTPError, *client.network_errors) as exc:
            status = _status(exc)
            transient = status is None or status >= 500 or status == 429
            # No route or no name resolution rarely heals in seconds: say so after two
            # quick retries instead of making an offline user wait through the full backoff.
            unreachable = status is None and not isinstance(exc, client.timeout_errors)
            if not transient or attempt == (NO_NETWORK_RETRIES if unreachable else remote.RETRIES):
                raise
            time.sleep(min(remote.MAX_BACKOFF_S, remote.BACKOFF_S * 2**attempt))
    raise AssertionError("unreachable")


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


@contextmanager
def hub_errors(hub_id: HubId, endpoint: str) -> Iterator[None]:
    """huggingface_hub's exceptions → one-line `InputError`s naming the fix."""
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
        RepositoryNotFoundError, RevisionNotFoundError,
    )

    network_errors = hub_http.hub_client().network_errors
    try:
        yield
    except GatedRepoError:
        raise InputError(
            f"{hub_id.repo_id} is gated: accept its terms on {endpoint}/{hub_id.repo_id} and set HF_TOKEN "
            "(or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{hub_id.repo_id}: no such model on {endpoint}, or it is private (then set HF_TOKEN or run "
            "`hf auth login`); a local folder of that name does not exist either"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"{hub_id.repo_id} has no revision {hub_id.revision!r}; give a branch, tag or commit") from None
    except LocalEntryNotFoundError as exc:
        raise _no_network(endpoint, exc.__cause__ or exc) from None
    except EntryNotFoundError as exc:
        raise InputError(f"{hub_id}: a file the repository lists is missing (HTTP 404): {_first_line(exc)}") from None
    except network_errors as exc:
        raise _no_network(endpoint, exc) from None
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise remote.http_error(status, str(hub_id)) from None
        raise RuntimeFailure(f"{hub_id}: the Hub answered HTTP {status} after retries; try again later") from None


# Connection errors (requests' nest urllib3's in a long repr, httpx's carry the OS error); these
# say which it was.
_NETWORK_REASONS = (
    ("NameResolution", "cannot resolve the host name"), ("Name or service not known", "cannot resolve the host name"),
    ("Connection refused", "connection refused"), ("unreachable", "network unreachable"),
    ("timed out", "timed out"), ("Timeout", "timed out"),
)


def _no_network(endpoint: str, exc: BaseException) -> RuntimeFailure:
    text = str(exc)
    reason = next((why for key, why in _NETWORK_REASONS if key in text), "no connection")
    return RuntimeFailure(
        f"cannot reach {endpoint} ({reason}); check the network, or use the Hugging Face cache "
        "with --offline (or HF_HUB_OFFLINE=1)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def _weights_index(folder: Path) -> tuple[str, dict[str, str]] | None:
    """(index file name, tensor -> shard) of a sharded safetensors model; None for a single file."""
    index = FORMATS[0][1]  # streaming is for safetensors only
    return (index, read_index(folder / index)) if (folder / index).is_file() else None
