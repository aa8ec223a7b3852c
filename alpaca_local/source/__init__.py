"""Read a Hugging Face model folder: config.json, the weight index, tensors, the tokenizer.

Holds: `config` (config.json → ModelConfig), `weights` (find safetensors / .bin files,
single or sharded), `safetensors_io` and `torch_bin` (headers → located tensors, never
executing a pickle), `tensors` (a tensor located in a file, read in row chunks), `vocab`
(SentencePiece or BPE tokenizer → GGUF vocabulary), `adapter` (a PEFT LoRA adapter folder →
checked LoRA pairs with PEFT's scales, whole-module replacements).

May import: `alpaca_local.errors` only. Nothing here knows about GGUF or llama.cpp.
"""
