"""In-memory token data for engine tests, independent of the data pipeline."""

import torch

from posttrain.engine.trainer import TrainData
from posttrain.losses.sft import IGNORE_INDEX


def random_items(n, vocab, *, seed=0, min_len=4, max_len=24):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        labels = list(ids)
        cut = int(torch.randint(1, L - 1, (1,), generator=g))
        labels[:cut] = [IGNORE_INDEX] * cut  # a "prompt" with no loss
        items.append((ids, labels))
    return items


def pad_collate(items, pad_id=0):
    T = max(len(i) for i, _ in items)
    ids = torch.full((len(items), T), pad_id)
    labels = torch.full((len(items), T), IGNORE_INDEX)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for r, (i, l) in enumerate(items):
        ids[r, :len(i)] = torch.tensor(i)
        labels[r, :len(l)] = torch.tensor(l)
        mask[r, :len(i)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "num_real_tokens": int(mask.sum())}


def token_data(n=16, vocab=400, seed=0, n_eval=0):
    items = random_items(n + n_eval, vocab, seed=seed)
    return TrainData(train=items[:n], eval=items[n:] or None, collate=pad_collate)
