"""Run a GGUF model with llama.cpp: chat, the OpenAI-compatible server, Ollama export.

Holds: `chat` (the one loader, prompt formats, streaming with marker stops),
`model_template` (a model's own chat template in Jinja's sandbox), `serve` (the
OpenAI-compatible server), `modelfile` (Ollama Modelfile), `cpu_buffers` (where a load puts
the weights on the CPU, so an AMX build does not crash; the pre-flight decode).

May import: `alpaca_local.template`, `alpaca_local.convert` (header reader, atomic
writes), `alpaca_local.errors`. Never the CLI layer.
"""
