"""The device check's own parts (benchmarks/gpu.py): reading llama.cpp's CUDA load log, and the
sparse files its speed runs generate from. The check itself needs a GPU (benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from alpaca_local.convert.gguf_read import read_gguf_header
from alpaca_local.plan import catalog
from alpaca_local.plan import memory as plan

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)

# The lines llama.cpp prints for a 7B with 20 of 33 layers on the GPU (formats of
# llama-model.cpp:1930, llama-kv-cache.cpp:291, llama-context.cpp:381/496/499/740).
CUDA_LOG = """\
load_tensors: offloaded 20/33 layers to GPU
load_tensors:        CUDA0 model buffer size =  2320.25 MiB
load_tensors:   CPU_Mapped model buffer size =  3891.24 MiB
llama_context:  CUDA_Host  output buffer size =     0.12 MiB
llama_kv_cache:      CUDA0 KV buffer size =   640.00 MiB
llama_kv_cache:        CPU KV buffer size =   384.00 MiB
llama_kv_cache: size = 1024.00 MiB (  2048 cells,  32 layers,  1/1 seqs), K (f16):  512.00 MiB, V (f16):  512.00 MiB
sched_reserve:      CUDA0 compute buffer size =   353.00 MiB
sched_reserve:  CUDA_Host compute buffer size =    12.01 MiB
~llama_context:      CUDA0 compute buffer size of 360.5000 MiB, does not match expectation of 353.0000 MiB
~llama_context:  CUDA_Host compute buffer size is  12.0117 MiB, matches expectation of  12.0117 MiB
"""


def test_the_cuda_log_is_read_per_buffer():
    r = gpu.parse_buffers(CUDA_LOG)
    assert r["model"] == {"CUDA0": 2320.25, "CPU_Mapped": 3891.24}
    assert r["kv"] == {"CUDA0": 640.0, "CPU": 384.0}
    assert r["kv_cells"] == [2048]
    assert r["output"] == {"CUDA_Host": 0.12}
    # the size at teardown counts, grown or not; the reserved one is kept beside it
    assert r["compute"] == {"CUDA0": 360.5, "CUDA_Host": 12.0117}
    assert r["compute_reserved"] == {"CUDA0": 353.0, "CUDA_Host": 12.01}


def test_a_log_cut_before_teardown_falls_back_to_the_reserved_compute():
    r = gpu.parse_buffers(CUDA_LOG.split("~llama_context")[0])
    assert r["compute"] == {"CUDA0": 353.0, "CUDA_Host": 12.01}


def test_pinned_host_buffers_count_as_host_memory():
    r = gpu.parse_buffers(CUDA_LOG)
    assert gpu._gpu_part(r["model"]) == 2320.25 and gpu._host_part(r["model"]) == 3891.24
    assert gpu._gpu_part(r["compute"]) == 360.5 and gpu._host_part(r["compute"]) == 12.0117
    assert gpu._gpu_part({"CUDA0": 1.0, "CUDA1": 2.0}) == 3.0


def test_the_speed_files_end_sequences_at_the_last_token(tmp_path):
    # Zero weights tie every logit and the sampler takes the lowest id: with "</s>" at 2 the
    # first token would end the reply, so the speed runs move it to the last id.
    shape = replace(plan.shape_from_config(catalog.load("alpaca-7b"), "alpaca-7b", "catalog"), n_layer=1)
    path = gpu.write_sparse_gguf(tmp_path / "m.gguf", shape, "q4_k_m", eos=shape.vocab_size - 1)
    kv = read_gguf_header(path).kv
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert kv["tokenizer.ggml.eos_token_id"] == shape.vocab_size - 1
    assert tokens[-1] == "</s>" and types[-1] == 3
    assert tokens[2].startswith("\u2581t") and types[2] == 1
    assert len(tokens) == shape.vocab_size == 32001
