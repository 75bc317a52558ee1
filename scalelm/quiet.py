"""What the engines print that a user can do nothing about, silenced before they are imported: notices about
kernels that are not installed, deprecations inside megatron-core, DeepSpeed's accelerator guess, transformers'
progress bars. Every command and every rank calls `quiet_engines` first."""

from __future__ import annotations


def quiet_engines(hf: bool = False) -> None:
    """The engines' notices about kernels that are not installed, and transformers' progress bars, say nothing
    a user can act on here."""
    import os
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|transformer_engine).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # DeepSpeed's pipeline backpropagates through a broadcast of its tied weights, which torch warns of on every rank
    warnings.filterwarnings("ignore", message=".*c10d::broadcast_: an autograd kernel was not registered.*")
    if not torch.cuda.is_available():  # advice about CUDA streams for tensor-parallel layers, on a machine without any
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is a local folder
    if hf:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
