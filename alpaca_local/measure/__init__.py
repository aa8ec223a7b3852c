"""Measure what a quant level loses: perplexity, KL divergence, top-1 agreement, speed.

Holds: `quality` and `data/eval.txt` (the default evaluation text).

May import: `alpaca_local.run`, `alpaca_local.convert`, `alpaca_local.errors`.
"""
