"""alpaca-local: convert, plan and chat with Alpaca-style models on your own machine."""

__version__ = "0.1.0"
