"""scalelm: pretrain GPT-style decoders from raw text to a servable model."""

__version__ = "0.1.0"
