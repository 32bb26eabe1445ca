"""What the built-in language models share: token windows, their loss, held-out evaluation.

``charlm`` (bytes) and ``gpt`` (BPE tokens) differ in their tokens and model;
how a stream of token ids becomes training and evaluation batches is the same.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from jobs.interface import JobError

# (inputs, next-token targets), each [batch, context] (or [batches, batch, context])
Batch = tuple[torch.Tensor, torch.Tensor]


def corpus_files(corpus: str | None, max_files: int, job: str, kinds: str) -> list[str]:
    """The sorted files of a ``corpus`` glob (default: this Python's standard library), at most ``max_files``.

    Listed when the job is built, so a glob matching nothing is one clear error at ``init``.
    """
    if corpus is None:
        pattern = os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
    else:
        pattern = os.path.expanduser(corpus)
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise JobError(
            f"{job} corpus {pattern!r} matches no files: pass --job-arg corpus=GLOB that names {kinds}"
        )
    return files[:max_files]


def local_files(path: str) -> list[str]:
    """The files at ``path`` on this machine, sorted: a file, every file under a folder, or a glob."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        expanded = os.path.join(expanded, "**", "*")
    return sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))


def check_shard(index: int, count: int) -> None:
    """Refuse a shard index outside ``[0, count)``."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1} (count={count})")


def shard_of(pieces: list[torch.Tensor], index: int, count: int, window: int) -> torch.Tensor:
    """The token ids shard ``index`` of ``count`` trains on, never shorter than a window.

    Pieces (files, documents) are dealt to shards by index; a shard whose pieces
    are too short falls back to its slice of all of them.
    """
    check_shard(index, count)
    dealt = pieces[index::count]
    if dealt and sum(len(p) for p in dealt) >= window:
        return torch.cat(dealt)
    whole = torch.cat(pieces)
    start = index * len(whole) // count
    end = max((index + 1) * len(whole) // count, start + window)
    if end > len(whole):
        start, end = len(whole) - window, len(whole)
    return whole[start:end]


def random_windows(tokens: torch.Tensor, window: int, batch_size: int) -> Iterator[Batch]:
    """Endless batches of random ``window``-long stretches of ``tokens``, drawn with torch's global RNG."""
    offsets = torch.arange(window)
    while True:
        starts = torch.randint(0, len(tokens) - window + 1, (batch_size,))
        windows = tokens[starts[:, None] + offsets].long()
        yield windows[:, :-1], windows[:, 1:]


def held_out_windows(tokens: torch.Tensor, window: int, batch_size: int, seed: int, batches: int) -> Batch:
    """``batches`` fixed batches of windows drawn by a private generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - window + 1, (batches * batch_size,), generator=gen)
    windows = tokens[starts[:, None] + torch.arange(window)].long().view(batches, batch_size, window)
    return windows[..., :-1], windows[..., 1:]


def next_token_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross entropy of ``model`` on ``batch``."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def evaluate_windows(model: nn.Module, windows: Batch) -> dict[str, float]:
    """Mean cross entropy and next-token accuracy of ``model`` on fixed batches; train mode kept."""
    xs, ys = windows
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, correct, tokens = 0.0, 0, 0
    try:
        with torch.no_grad():
            for x, y in zip(xs.to(device), ys.to(device), strict=True):
                logits = model(x).float()
                flat = logits.reshape(-1, logits.shape[-1])
                total += float(F.cross_entropy(flat, y.reshape(-1), reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
                tokens += y.numel()
    finally:
        model.train(was_training)
    return {"eval_loss": total / tokens, "eval_accuracy": correct / tokens}
