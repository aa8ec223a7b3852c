"""Fuzz the readers that see a stranger's file first: every mutation of a valid file ends
in a clean `AlpacaError` or a correct result, never another exception, a hang or a
memory blow-up.

Inputs are the tiny model's model.safetensors and `tiny_gguf` (converted by our own
converter). Mutations use a fixed seed, so a failure names a case that reproduces:
byte flips, truncations, inserted and deleted bytes, and overwrites of the format's
length fields (found by walking the pristine file) with huge values. Each case runs
under an interval timer (a hang raises) and tracemalloc (a huge allocation shows as a
peak); the whole batch has a wall-clock budget and stops early if a slow machine
reaches it.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import signal
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alpaca_local.errors import AlpacaError

SEED = 20240606
N_CASES = 300
BUDGET_S = 20.0  # per fuzz test; the cases run so far must all pass
MIN_CASES = 60  # even a slow, shared machine gets through this many
CASE_TIMEOUT_S = 3.0  # one case: a parse of a few MB, far below this unless it hangs
PEAK_BYTES = 64 << 20  # a valid header needs well under 10 MB of Python objects

HUGE = (2**64 - 1, 2**63, 2**62 + 7, 2**40, 2**32 - 1, 2**32, 2**31, 10**12, 0)


class Hang(Exception):
    pass


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run_batch(cases: Iterator[tuple[str, bytes]], check: Callable[[bytes], str]) -> dict[str, int]:
    """Run `check` on each mutated file; return how many ended in which way."""
    outcomes: dict[str, int] = {}
    start = time.perf_counter()
    tracemalloc.start()
    try:
        for i, (what, data) in enumerate(cases):
            if time.perf_counter() - start > BUDGET_S:
                break
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            try:
                with _deadline(CASE_TIMEOUT_S):
                    outcome = check(data)
            except AlpacaError as exc:
                text = str(exc)
                assert text and "\n" not in text and len(text) < 600, f"case {i} ({what}): message {text[:2000]!r}"
                outcome = f"error:{type(exc).__name__}"
            except Exception as exc:  # the point of the test: report which case, and how
                raise AssertionError(f"case {i} ({what}) raised {type(exc).__name__}: {exc}") from exc
            peak = tracemalloc.get_traced_memory()[1] - before
            assert peak < PEAK_BYTES, f"case {i} ({what}) allocated {peak / 1e6:.0f} MB"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        tracemalloc.stop()
    ran = sum(outcomes.values())
    print(f"{ran} cases in {time.perf_counter() - start:.1f} s: {outcomes}")
    assert ran >= min(MIN_CASES, N_CASES), f"only {ran} cases in {BUDGET_S} s: {outcomes}"
    return outcomes


def _errors(outcomes: dict[str, int]) -> int:
    return sum(v for k, v in outcomes.items() if k.startswith("error"))


def _mutations(data: bytes, fields: list[tuple[int, int]], hot_end: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """N_CASES mutations of `data`; `fields` are (offset, width) of length/count fields,
    `hot_end` bounds the header, where almost all mutations land."""
    rng = random.Random(seed)
    for _ in range(N_CASES):
        kind = rng.choice(("flip", "flip", "field", "field", "truncate", "insert", "delete", "tail"))
        buf = bytearray(data)
        if kind == "flip":
            spots = [rng.randrange(hot_end) for _ in range(rng.randint(1, 8))]
            for at in spots:
                buf[at] ^= 1 << rng.randrange(8)
            what = f"flip bits at {spots}"
        elif kind == "field":
            at, width = rng.choice(fields) if rng.random() < 0.8 else fields[rng.randrange(min(2, len(fields)))]
            value = rng.choice(HUGE) % (1 << (8 * width)) if rng.random() < 0.8 else rng.randrange(1 << (8 * width))
            buf[at : at + width] = value.to_bytes(width, "little")
            what = f"field at {at} (u{8 * width}) = {value}"
        elif kind == "truncate":
            cut = rng.randrange(hot_end) if rng.random() < 0.8 else rng.randrange(len(data))
            del buf[cut:]
            what = f"truncate to {cut}"
        elif kind == "insert":
            at, n = rng.randrange(hot_end), rng.randint(1, 16)
            buf[at:at] = rng.randbytes(n)
            what = f"insert {n} bytes at {at}"
        elif kind == "delete":
            at, n = rng.randrange(hot_end), rng.randint(1, 16)
            del buf[at : at + n]
            what = f"delete {n} bytes at {at}"
        else:  # a flip in the data, past the header: must not matter to a header reader
            at = rng.randrange(hot_end, len(data))
            buf[at] ^= 0xFF
            what = f"flip data byte {at}"
        yield what, bytes(buf)


# ---------------------------------------------------------------------------------------
# GGUF: the header reader, and chat's check of a model before llama.cpp sees it
# ---------------------------------------------------------------------------------------

_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_length_fields(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of every count, length, dimension, type and offset field of a
    valid GGUF, and where its tensor table ends. Written from the spec, independently of
    alpaca_local.gguf_read."""
    fields: list[tuple[int, int]] = [(8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string() -> None:
        nonlocal pos
        fields.append((pos, 8))
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n

    for _ in range(n_kv):
        string()
        fields.append((pos, 4))
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == 8:
            string()
        elif vtype == 9:
            fields += [(pos, 4), (pos + 4, 8)]
            etype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                if etype == 8:
                    string()
                else:
                    pos += _GGUF_SCALAR_SIZES[etype]
        else:
            pos += _GGUF_SCALAR_SIZES[vtype]
    for _ in range(n_tensors):
        string()
        fields.append((pos, 4))
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4
        fields += [(pos + 8 * d, 8) for d in range(n_dims)]
        pos += 8 * n_dims
        fields += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return fields, pos


def test_gguf_walker_agrees_with_the_reader(tiny_gguf: Path) -> None:
    from alpaca_local.convert.gguf_read import read_gguf_header

    data = tiny_gguf.read_bytes()
    fields, end = gguf_length_fields(data)
    header = read_gguf_header(tiny_gguf)
    assert header.data_offset == (end + 31) // 32 * 32
    assert len(fields) > len(header.kv["tokenizer.ggml.tokens"]) + 3 * len(header.tensors)


def test_fuzz_gguf_header_and_chat_check(tiny_gguf: Path, tmp_path: Path) -> None:
    from alpaca_local.run.chat import read_model_info
    from alpaca_local.convert.gguf_read import read_gguf_header

    data = tiny_gguf.read_bytes()
    fields, end = gguf_length_fields(data)
    good = read_gguf_header(tiny_gguf)
    path = tmp_path / "fuzzed.gguf"

    def check(mutated: bytes) -> str:
        path.write_bytes(mutated)
        header = read_gguf_header(path)
        # A header that reads must be consistent with the file that holds it.
        assert header.file_size == len(mutated)
        assert header.data_offset % header.alignment == 0
        for t in header.tensors:
            assert 0 <= t.offset and header.data_offset + t.offset + t.nbytes <= len(mutated), t
            assert len(t.shape) >= 1 and all(d > 0 for d in t.shape), t
        info = read_model_info(path)
        assert info.arch == header.arch
        assert info.context_length is None or info.context_length > 0
        same = (header.kv, header.tensors) == (good.kv, good.tensors)
        return "same" if same else "read, different"

    outcomes = _run_batch(_mutations(data, fields, end, SEED), check)
    assert outcomes.get("same", 0) > 0  # the data-byte flips at least
    assert _errors(outcomes) > sum(outcomes.values()) // 2  # most mutations are refused


# ---------------------------------------------------------------------------------------
# safetensors: the reader, and a whole plan_conversion on a folder holding the file
# ---------------------------------------------------------------------------------------


def _json_mutations(data: bytes, seed: int) -> Iterator[tuple[str, bytes]]:
    """Mutations of the header's meaning (kept valid JSON, length field kept right)."""
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    rng = random.Random(seed)
    values = [-1, 0, 1, 2**31, 2**63, 2**64, 10**30, 1.5, True, None, "7", [], {}]
    for _ in range(N_CASES // 3):
        h = json.loads(json.dumps(header))
        name = rng.choice(names)
        entry = h[name]
        kind = rng.choice(("offset", "offset", "shape", "dtype", "swap", "dup-range", "drop", "entry"))
        if kind == "offset":
            i = rng.randrange(2)
            entry["data_offsets"][i] = rng.choice(values + [entry["data_offsets"][i] + rng.randint(-64, 64)])
        elif kind == "shape":
            shape = entry["shape"]
            if shape and rng.random() < 0.7:
                shape[rng.randrange(len(shape))] = rng.choice(values)
            else:
                entry["shape"] = rng.choice([[], [0], shape[::-1], shape + [1], "x"])
        elif kind == "dtype":
            entry["dtype"] = rng.choice(["F64", "I8", "Q4", "f16", "", None, 5, [], {}, "BF16", "F32", "F16"])
        elif kind == "swap":
            other = h[rng.choice(names)]
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
        elif kind == "dup-range":
            other = h[rng.choice(names)]
            entry["data_offsets"] = list(other["data_offsets"])
        elif kind == "drop":
            del h[name]
        else:
            h[name] = rng.choice([None, [], "x", 3, {"dtype": "F16"}])
        raw = json.dumps(h).encode()
        raw += b" " * (-len(raw) % 8)
        yield f"{kind} on {name!r}", struct.pack("<Q", len(raw)) + raw + body


def test_fuzz_safetensors_reader_and_plan(tiny_model, tmp_path: Path) -> None:
    from alpaca_local.convert.pipeline import plan_conversion
    from alpaca_local.source.safetensors_io import read_safetensors

    folder = tmp_path / "model"
    shutil.copytree(tiny_model.path, folder)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    hot_end = 8 + n
    fields = [(0, 8)]  # the header length; the JSON's numbers are mutated by _json_mutations
    good = read_safetensors(path)
    expected_jobs = len(plan_conversion(folder, "q8_0").jobs)

    def check(mutated: bytes) -> str:
        path.write_bytes(mutated)
        refs = read_safetensors(path)
        for ref in refs.values():  # what the reader accepts lies inside the file
            assert ref.offset + ref.nbytes <= len(mutated), ref
        spans = sorted((r.offset, r.offset + r.nbytes) for r in refs.values() if r.nbytes)
        assert all(e1 <= b2 for (_, e1), (b2, _) in itertools.pairwise(spans)), "overlapping tensors accepted"
        plan = plan_conversion(folder, "q8_0")
        assert len(plan.jobs) == expected_jobs
        return "same" if refs == good else "read, different"

    cases = list(_mutations(data, fields, hot_end, SEED))
    cases += list(_json_mutations(data, SEED + 1))
    random.Random(SEED).shuffle(cases)
    outcomes = _run_batch(iter(cases), check)
    assert _errors(outcomes) > sum(outcomes.values()) // 2
