"""What leaves the machine: the model card of a published folder, and the upload to the Hub.

Holds: `card` (README.md for a folder of levels: Hub front matter, files and exact sizes,
measured quality, source, imatrix, prompt format, license; facts only) and `upload` (a
folder to a Hub repository with huggingface_hub's upload API, one commit).

May import: `alpaca_local.measure`, `alpaca_local.run`, `alpaca_local.plan`,
`alpaca_local.convert`, `alpaca_local.source`, `alpaca_local.errors`, `alpaca_local.template`.
"""
