"""``charlm``: a small GPT-style byte-level language model, the built-in job.

Corpus: the files matched by ``corpus`` (default: the running Python's standard
library ``*.py`` files, present everywhere, no download), sorted, at most
``max_files`` of them and ``max_bytes`` in total, read as raw bytes (vocab 256).
Every ``eval_every``-th file is held out for evaluation; the rest are training
files, dealt to shards by index (file ``i`` goes to shard ``i % count``). A shard
whose files are too few falls back to a byte range of the whole training text, so
no shard is ever empty.

Training batches are random windows drawn with torch's *global* RNG, which the
trainer seeds per (run, round, shard). Evaluation uses fixed windows from a
private generator, so ``evaluate`` is deterministic for a given model.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from jobs.generation import continue_ids
from jobs.interface import JobError, seeded
from jobs.language import (
    Batch,
    check_shard,
    corpus_files,
    evaluate_windows,
    held_out_windows,
    next_token_loss,
    random_windows,
    shard_of,
)
from jobs.slicing import by_blocks
from jobs.transformer import Block

VOCAB = 256
_EVAL_SEED = 0x5EED_C4A1  # fixed: every run and every model sees the same eval windows
_PROBE_SEED = 0x9A0BE  # the probe windows: held-out text too, drawn apart from the eval ones
PROBE_BATCHES = 8
_INIT_STD = 0.02


@dataclass(frozen=True)
class CharLMConfig:
    """The ``--job-arg`` knobs of charlm, validated once."""

    layers: int = 2
    width: int = 64
    heads: int = 4
    context: int = 64
    batch_size: int = 16
    corpus: str | None = None
    max_files: int = 200
    max_bytes: int = 4_000_000
    eval_every: int = 10
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject bad values with a message naming the knob and the fix."""
        minimums = {
            "layers": 1,
            "width": 1,
            "heads": 1,
            "context": 1,
            "batch_size": 1,
            "max_files": 1,
            "max_bytes": 2,
            "eval_every": 2,
            "eval_batches": 1,
        }
        for knob, low in minimums.items():
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise JobError(f"charlm {knob} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise JobError(f"charlm seed must be an integer, got {self.seed!r}")
        if self.width % self.heads:
            raise JobError(f"charlm width ({self.width}) must be divisible by heads ({self.heads})")
        if self.corpus is not None and (not isinstance(self.corpus, str) or not self.corpus):
            raise JobError(f"charlm corpus must be a glob string, got {self.corpus!r}")


class CharGPT(nn.Module):
    """Token + position embeddings, pre-LN transformer blocks, untied output head."""

    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.context = cfg.context
        self.tok = nn.Embedding(VOCAB, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        # Untied: tied weights would be two state_dict names for one tensor, which
        # breaks per-name deltas and safetensors export.
        self.head = nn.Linear(cfg.width, VOCAB, bias=False)
        self._init_weights(cfg.layers)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Return next-byte logits ``[batch, time, 256]`` for byte ids ``[batch, time]``."""
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} bytes exceeds the model context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def _init_weights(self, layers: int) -> None:
        """GPT-2 style init, so the first loss is close to ln(256)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=_INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=_INIT_STD)
        for block in self.blocks:  # residual projections scaled by depth (GPT-2)
            assert isinstance(block, Block)
            nn.init.normal_(block.attn_out.weight, std=_INIT_STD / math.sqrt(2 * layers))
            nn.init.normal_(block.mlp_out.weight, std=_INIT_STD / math.sqrt(2 * layers))


class CharLMJob:
    """The charlm job: model, shards, loss and evaluation over a byte corpus."""

    name = "charlm"
    reuse_model = True  # weights and constant buffers only: a volunteer trains one model shard after shard
    outputs = "next-token"  # runs of it can be ensembled, weighed by posterior too (coordinator fuse)

    def __init__(self, config: CharLMConfig) -> None:
        self.config = config
        self.batch_size = config.batch_size
        self.files = corpus_files(
            config.corpus, config.max_files, "charlm", "text files"
        )  # listed now so a bad glob fails at load time
        self._corpus: _Corpus | None = None
        self._eval: Batch | None = None
        self._probe: Batch | None = None

    def build_model(self) -> CharGPT:
        """Return a fresh model; the same seed gives identical weights, global RNG untouched."""
        with seeded(self.config.seed):
            return CharGPT(self.config)

    def shard(self, index: int, count: int) -> Iterator[Batch]:
        """Yield endless ``(x, y)`` batches of random windows from shard ``index`` of ``count``."""
        return self._windows(self.shard_text(index, count))

    def local_shard(self, path: str) -> Iterator[Batch]:
        """Endless batches from the text files at ``path`` (a file, folder or glob) on this machine."""
        return self._windows(_read_local(path, self.config))

    def _windows(self, text: torch.Tensor) -> Iterator[Batch]:
        """Random ``(x, y)`` windows of ``text``, drawn with torch's global RNG."""
        return random_windows(text, self.config.context + 1, self.batch_size)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Return the mean next-byte cross entropy of ``model`` on ``batch``."""
        return next_token_loss(model, batch)

    def slices(self, model: nn.Module, count: int) -> list[list[str]]:
        """``init --slices``: cut between layers (embeddings, each block, final norm and head)."""
        return by_blocks(model, count)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Return mean cross entropy and next-byte accuracy on the fixed held-out windows."""
        return evaluate_windows(model, self._eval_windows())

    def evaluate_corpus(self, model: nn.Module, path: str) -> dict[str, float]:
        """``evaluate`` on fixed windows of the text at ``path`` (a file, folder or glob) instead."""
        cfg = self.config
        text = _read_local(path, cfg)
        return evaluate_windows(
            model, held_out_windows(text, cfg.context + 1, cfg.batch_size, _EVAL_SEED, cfg.eval_batches)
        )

    def generate(
        self, model: nn.Module, prompt: str, tokens: int, *, temperature: float = 0.8, seed: int = 0
    ) -> str:
        """``prompt`` and ``tokens`` more bytes sampled from ``model``, as text (``coordinator sample``)."""
        ids = list(prompt.encode("utf-8")) or [ord("\n")]
        more = continue_ids(model, ids, tokens, self.config.context, temperature=temperature, seed=seed)
        return bytes(ids + more).decode("utf-8", errors="replace")

    def shard_files(self, index: int, count: int) -> list[str]:
        """Names of the training files dealt to shard ``index`` (empty: byte-range fallback)."""
        check_shard(index, count)
        return [name for name, _ in self.corpus().train[index::count]]

    def shard_text(self, index: int, count: int) -> torch.Tensor:
        """The uint8 bytes shard ``index`` of ``count`` trains on, never shorter than a window."""
        pieces = [data for _, data in self.corpus().train]
        return shard_of(pieces, index, count, self.config.context + 1)

    def probe_batches(self) -> list[Batch]:
        """A few fixed held-out batches on which the aggregator weighs each delta (``--verify probe``)."""
        if self._probe is None:
            self._probe = self._held_out_windows(_PROBE_SEED, PROBE_BATCHES)
        xs, ys = self._probe
        return list(zip(xs, ys, strict=True))

    def corpus(self) -> _Corpus:
        """Read the corpus once (lazily, so building a job is cheap) and keep it."""
        if self._corpus is None:
            self._corpus = _read_corpus(self.files, self.config)
        return self._corpus

    def _eval_windows(self) -> Batch:
        """Fixed eval windows ``[eval_batches, batch_size, context]`` from a private generator."""
        if self._eval is None:
            self._eval = self._held_out_windows(_EVAL_SEED, self.config.eval_batches)
        return self._eval

    def _held_out_windows(self, seed: int, batches: int) -> Batch:
        """``batches`` fixed batches of held-out windows drawn by a private generator seeded ``seed``."""
        cfg = self.config
        return held_out_windows(self.corpus().eval, cfg.context + 1, cfg.batch_size, seed, batches)


def make_job(**kwargs: Any) -> CharLMJob:
    """Factory behind ``--job charlm``: keyword arguments are the ``--job-arg`` knobs."""
    known = [f.name for f in fields(CharLMConfig)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise JobError(f"unknown charlm argument {unknown[0]!r}: known are {', '.join(known)}")
    return CharLMJob(CharLMConfig(**kwargs))


@dataclass(frozen=True)
class _Corpus:
    """Training files (name, bytes) and the held-out evaluation text."""

    train: list[tuple[str, torch.Tensor]]
    eval: torch.Tensor


def _read_corpus(files: list[str], cfg: CharLMConfig) -> _Corpus:
    """Read up to ``max_bytes`` of the files and split off every ``eval_every``-th for eval."""
    texts = [
        (name, torch.frombuffer(bytearray(data), dtype=torch.uint8))
        for name, data in _read_files(files, cfg.max_bytes, "corpus")
    ]
    n = cfg.context + 1
    total = sum(len(t) for _, t in texts)
    if total < 2 * n:
        raise JobError(
            f"charlm corpus has {total} bytes, fewer than two windows of context+1={n}: "
            "use more text or a smaller context"
        )
    held = [t for i, (_, t) in enumerate(texts) if i % cfg.eval_every == cfg.eval_every - 1]
    train = [nt for i, nt in enumerate(texts) if i % cfg.eval_every != cfg.eval_every - 1]
    eval_len = sum(len(t) for t in held)
    if eval_len >= n and sum(len(t) for _, t in train) >= n:
        return _Corpus(train=train, eval=torch.cat(held))
    # Too few files to hold whole ones out: hold out the last tenth of the bytes instead.
    cut = min(total - n, total - total // 10)
    whole = torch.cat([t for _, t in texts])
    kept: list[tuple[str, torch.Tensor]] = []
    offset = 0
    for name, t in texts:
        if offset < cut:
            kept.append((name, t[: cut - offset]))
        offset += len(t)
    return _Corpus(train=kept, eval=whole[cut:])


def _read_files(files: list[str], budget: int, what: str) -> list[tuple[str, bytes]]:
    """The non-empty contents of ``files`` in order, at most ``budget`` bytes in all."""
    texts: list[tuple[str, bytes]] = []
    for path in files:
        if budget <= 0:
            break
        try:
            with open(path, "rb") as f:
                data = f.read(budget)
        except OSError as e:
            raise JobError(f"charlm cannot read {what} file {path!r}: {e}") from e
        if data:
            texts.append((path, data))
            budget -= len(data)
    return texts


def _read_local(path: str, cfg: CharLMConfig) -> torch.Tensor:
    """A volunteer's own text at ``path``, up to ``max_bytes``; JobError if there is too little."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        expanded = os.path.join(expanded, "**", "*")
    files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    text = b"".join(data for _, data in _read_files(files, cfg.max_bytes, "local data"))
    if len(text) < cfg.context + 1:
        raise JobError(f"charlm local data at {path!r} has {len(text)} bytes, fewer than one window")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)
