"""The post-training workloads of the distributed tests (module-level, so the ranks can import them): batches of
packed preference pairs and labelled texts as the loader makes them, and runs over several objectives."""

from __future__ import annotations

import torch

from tests.helpers.workloads import LEARNABLE, train_steps


def preference_batch(rows: int, seq_len: int, gen: torch.Generator, reference: bool) -> dict:
    """A batch of packed preference pairs as the loader makes them (data/packing.py): each window one or two pairs,
    each side a prompt then a reply whose tokens are its targets, then padding; with `reference`, random reference
    log-probs per document, as scored ones would be."""
    import numpy as np

    from scalelm.data.chat import ASSISTANT, LAST
    from scalelm.data.packing import chat_window

    windows = []
    for _ in range(rows):
        pairs = int(torch.randint(1, 3, (1,), generator=gen))
        lengths = torch.randint(3, seq_len // (2 * pairs) + 1, (2 * pairs,), generator=gen)
        flags = []
        for n in lengths.tolist():
            prompt = int(torch.randint(1, n, (1,), generator=gen))
            flags += [0] * prompt + [ASSISTANT | LAST] * (n - prompt)
        tokens = torch.randint(0, LEARNABLE, (int(lengths.sum()),), generator=gen)
        window = chat_window(tokens.numpy(), np.asarray(flags, np.uint8), lengths.numpy(), seq_len, "assistant")
        if reference:
            window["reference"] = np.zeros(seq_len, np.float32)
            window["reference"][: 2 * pairs] = (torch.randn(2 * pairs, generator=gen) * 2 - 3 * lengths).numpy()
        windows.append(window)
    return {k: torch.from_numpy(np.stack([w[k] for w in windows])) for k in windows[0]}


def labelled_batch(rows: int, seq_len: int, gen: torch.Generator, classes: int) -> dict:
    """A batch of packed labelled texts as the loader makes them: each window one to three texts, then padding."""
    import numpy as np

    from scalelm.data.packing import chat_window

    windows = []
    for _ in range(rows):
        texts = int(torch.randint(1, 4, (1,), generator=gen))
        lengths = torch.randint(2, seq_len // texts + 1, (texts,), generator=gen)
        tokens = torch.randint(0, LEARNABLE, (int(lengths.sum()),), generator=gen)
        window = chat_window(tokens.numpy(), np.zeros(tokens.numel(), np.uint8), lengths.numpy(), seq_len, "assistant")
        window["classes"] = np.full(seq_len, -1, np.int64)
        window["classes"][:texts] = torch.randint(0, classes, (texts,), generator=gen).numpy()
        windows.append(window)
    return {k: torch.from_numpy(np.stack([w[k] for w in windows])) for k in windows[0]}


def pairwise_steps(overrides: list[str], variants: dict[str, list[str]], steps: int = 3) -> dict:
    """`train_steps` once per variant on these ranks, each with the variant's overrides after `overrides` (for
    DPO full and LoRA, and a reward model): {variant: train_steps' result}. One process group serves them all."""
    names = list(variants)
    return {name: train_steps(overrides + variants[name], steps, keep_group=name != names[-1]) for name in names}


def score_run(overrides: list[str]) -> None:
    """`scalelm score --overwrite` with these overrides, on these ranks."""
    from scalelm.train.finetune import load_finetune_config
    from scalelm.train.score import score_command

    score_command(load_finetune_config(None, overrides), overwrite=True)
