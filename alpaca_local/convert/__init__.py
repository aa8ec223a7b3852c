"""The GGUF side: map a source model to GGUF, choose per-tensor types, quantize, write.

Holds: `architectures` (one table entry per architecture: names, shapes, metadata),
`quant_levels` (the level names llama-quantize offers, aliases, what is known of each),
`quant_rules` (per-tensor type choice and byte sizes, shared with `plan`: the converter's step
and `llama_quant`, the port of llama-quant.cpp's rules for every file type),
`ggml` (ggml's quantizers through ctypes), `pipeline` (plan a conversion, stream
chunks, write the file), `search` (a size target: per-tensor types by measured error under an
exact byte budget), `atomic` (temp file + rename, --force, disk-space checks),
`gguf_read` (bounds-checked GGUF header reader for files we did not write),
`imatrix_file` (llama.cpp's importance-matrix files: GGUF and legacy .dat), `lora_merge`
(PEFT adapters merged into the weights chunk by chunk while streaming), `lora_gguf`
(a PEFT adapter → llama.cpp LoRA adapter GGUF, and its checked header for chat/serve/plan),
`cpu_repack` (which weights ggml-cpu's CPU_REPACK takes and how alpaca-local's loads place
them on the CPU: one truth for `plan` and `run`), `levels` (several quant levels written
from one read of the source), `split` (llama.cpp's split GGUF format: part names, the
partition rule, reading a split model whole).

May import: `alpaca_local.source`, `alpaca_local.errors`, `alpaca_local.template`.
"""
