"""Who holds what: ranks and groups (topology), the DeepSpeed engine, and the CPU redirection for megatron-core."""
