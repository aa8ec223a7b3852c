"""Measure what a quant level loses: perplexity, KL divergence, top-1 agreement, speed.

Holds: `quality` and `data/eval.txt` (the default evaluation text); `quality_files`
(the files it measures: levels, size targets, other GGUFs); `imatrix`
(llama-imatrix's statistics through llama.cpp's eval callback) and
`data/calibration.txt` (the default calibration text); `calibrate` (the
`convert --calibrate` route: temporary model, imatrix, cleanup).

May import: `alpaca_local.run`, `alpaca_local.convert`, `alpaca_local.errors`.
"""
