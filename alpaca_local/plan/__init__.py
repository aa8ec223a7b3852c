"""How much memory a model takes in llama.cpp, and which quant level fits a device.

Holds: `shape` (ModelShape: the facts the planner needs, whatever they were read
from), `memory` (the planner's arithmetic per level; ggml-cpu's CPU_REPACK rules
come from `convert.cpu_repack`, shared with the runtime), `gpu` (NVML / nvidia-smi /
Apple / RAM detection), `catalog` (models/catalog.json entries).

May import: `alpaca_local.convert`, `alpaca_local.source`, `alpaca_local.errors`.
"""
