"""``gpt``: a GPT-2-shaped decoder over a byte-level BPE tokenizer trained on the corpus.

Presets run from ``nano`` (about 1M parameters, CPU-friendly) to ``small``
(GPT-2 small's shape, about 124M); ``layers``, ``width``, ``heads``,
``context`` and ``vocab`` override a preset. Pre-norm blocks, learned or rotary
positions (``positions=learned|rotary``), output head tied to the token
embedding (one tensor, so one name in the state dict and in every delta).

Corpus: the files matched by ``corpus`` (default: the running Python's standard
library ``*.py``, present everywhere, no download): plain text (one document a
file), JSONL (``*.jsonl``: one document a line, its ``text_field``) or Parquet
(``*.parquet``: the ``text_field`` column, read with pyarrow), at most
``max_files`` files and ``max_bytes`` of text. Every ``eval_every``-th document
is held out; the rest are dealt to shards by index.

The tokenizer (Hugging Face ``tokenizers``, byte-level BPE, ``vocab`` ids with
``<|endoftext|>`` after each document) is trained on the training documents when
the data is first needed, the same on every machine that holds the same corpus
(the training is deterministic), or read from ``tokenizer=PATH``. ``coordinator
init`` saves it with the run (``runs/NAME/tokenizer.json``). A run whose
volunteers do not all hold the same corpus files (the default corpus differs
between Python versions) is created with ``--job-arg tokenizer=PATH`` naming a
tokenizer file every machine has.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jobs.generation import continue_ids
from jobs.interface import JobError, seeded
from jobs.language import (
    Batch,
    corpus_files,
    evaluate_windows,
    held_out_windows,
    local_files,
    next_token_loss,
    random_windows,
    shard_of,
)
from jobs.slicing import by_blocks
from jobs.transformer import Block, rotary_tables

END_OF_TEXT = "<|endoftext|>"
_EVAL_SEED = 0x6E7A_E7A1
_PROBE_SEED = 0x6E7A_9A0B
PROBE_BATCHES = 8
_INIT_STD = 0.02
# name -> (layers, width, heads, context, vocab)
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "nano": (4, 128, 4, 128, 2048),  # ~1.1M parameters
    "micro": (6, 256, 8, 256, 4096),  # ~5.8M
    "mini": (8, 512, 8, 512, 8192),  # ~29M
    "small": (12, 768, 12, 1024, 50257),  # GPT-2 small: ~124M
}


@dataclass(frozen=True)
class GPTConfig:
    """The ``--job-arg`` knobs of gpt, validated once; a preset fills what is not given."""

    preset: str = "nano"
    layers: int | None = None
    width: int | None = None
    heads: int | None = None
    context: int | None = None
    vocab: int | None = None
    positions: str = "learned"
    batch_size: int = 8
    corpus: str | None = None
    text_field: str = "text"
    tokenizer: str | None = None
    max_files: int = 200
    max_bytes: int = 4_000_000
    eval_every: int = 10
    eval_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject bad values with a message naming the knob and the fix."""
        if self.preset not in PRESETS:
            raise JobError(f"gpt preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for knob, low in {"layers": 1, "width": 1, "heads": 1, "context": 2, "vocab": 257}.items():
            value = getattr(self, knob)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise JobError(f"gpt {knob} must be an integer >= {low}, got {value!r}")
        minimums = {"batch_size": 1, "max_files": 1, "max_bytes": 2, "eval_every": 2, "eval_batches": 1}
        for knob, low in minimums.items():
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise JobError(f"gpt {knob} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise JobError(f"gpt seed must be an integer, got {self.seed!r}")
        if self.positions not in ("learned", "rotary"):
            raise JobError(f"gpt positions must be learned or rotary, got {self.positions!r}")
        for knob in ("corpus", "tokenizer"):
            value = getattr(self, knob)
            if value is not None and (not isinstance(value, str) or not value):
                raise JobError(f"gpt {knob} must be a path or glob string, got {value!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise JobError(f"gpt text_field must be a column or key name, got {self.text_field!r}")
        if self.shape[1] % self.shape[2]:
            raise JobError(f"gpt width ({self.shape[1]}) must be divisible by heads ({self.shape[2]})")
        if self.positions == "rotary" and (self.shape[1] // self.shape[2]) % 2:
            raise JobError("gpt positions=rotary needs an even width per head (width / heads)")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(layers, width, heads, context, vocab): the preset's, overridden by the knobs given."""
        base = PRESETS[self.preset]
        given = (self.layers, self.width, self.heads, self.context, self.vocab)
        layers, width, heads, context, vocab = (
            b if g is None else g for g, b in zip(given, base, strict=True)
        )
        return layers, width, heads, context, vocab


class GPT(nn.Module):
    """Token embedding (+ learned positions), pre-LN blocks, final norm, head tied to the embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        layers, width, heads, context, vocab = cfg.shape
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        if cfg.positions == "rotary":  # tables, not weights: kept out of the state dict
            cos, sin = rotary_tables(context, width // heads)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self._init_weights(layers)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[batch, time, vocab]`` for token ids ``[batch, time]``."""
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens exceeds the model context {self.context}")
        x = self.tok(idx)
        rotary = None
        if self.pos is not None:
            x = x + self.pos(torch.arange(t, device=idx.device))
        else:
            rotary = (self.rotary_cos, self.rotary_sin)
        for block in self.blocks:
            x = block(x, rotary)
        return F.linear(self.ln_f(x), self.tok.weight)

    def _init_weights(self, layers: int) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=_INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn_out.weight, std=_INIT_STD / math.sqrt(2 * layers))
            nn.init.normal_(block.mlp_out.weight, std=_INIT_STD / math.sqrt(2 * layers))


class GPTJob:
    """The gpt job: model, token shards, loss, evaluation and text generation."""

    name = "gpt"
    reuse_model = True  # weights and constant rotary tables only: reused shard after shard
    outputs = "next-token"  # runs of it can be ensembled, weighed by posterior too (coordinator fuse)

    def __init__(self, config: GPTConfig) -> None:
        self.config = config
        self.batch_size = config.batch_size
        self.files = corpus_files(
            config.corpus, config.max_files, "gpt", "text, .jsonl or .parquet files"
        )  # listed now so a bad glob fails at load time
        self._eval: Batch | None = None
        self._probe: Batch | None = None

    def build_model(self) -> GPT:
        """A fresh model; the same seed gives identical weights, the global RNG untouched."""
        with seeded(self.config.seed):
            return GPT(self.config)

    def data(self) -> _Data:
        """Tokenizer and token streams, built once per process for this configuration."""
        return _load_data(self.config, tuple(self.files))

    def tokenizer_json(self) -> str:
        """The tokenizer as JSON, for the run's folder and for volunteers without the corpus."""
        return str(self.data().tokenizer.to_str())

    def shard(self, index: int, count: int) -> Iterator[Batch]:
        """Endless ``(x, y)`` batches of random windows from shard ``index`` of ``count``."""
        return self._windows(self.shard_tokens(index, count))

    def shard_tokens(self, index: int, count: int) -> torch.Tensor:
        """The token ids shard ``index`` of ``count`` trains on, never shorter than a window."""
        return shard_of(self.data().train, index, count, self.window)

    @property
    def window(self) -> int:
        return self.config.shape[3] + 1

    def _windows(self, tokens: torch.Tensor) -> Iterator[Batch]:
        return random_windows(tokens, self.window, self.batch_size)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean next-token cross entropy of ``model`` on ``batch``."""
        return next_token_loss(model, batch)

    def slices(self, model: nn.Module, count: int) -> list[list[str]]:
        """``init --slices``: cut between layers (embeddings, each block, final norm and head)."""
        return by_blocks(model, count)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean cross entropy (nats per token) and next-token accuracy on fixed held-out windows."""
        if self._eval is None:
            self._eval = self._held_out(_EVAL_SEED, self.config.eval_batches)
        return evaluate_windows(model, self._eval)

    def evaluate_corpus(self, model: nn.Module, path: str) -> dict[str, float]:
        """``evaluate`` on fixed windows of the documents at ``path`` (a file, folder or glob) instead."""
        try:
            documents = _documents(local_files(path), self.config)
        except JobError:  # no text there: said below, naming the path
            documents = []
        tokenizer = self.data().tokenizer
        end = tokenizer.token_to_id(END_OF_TEXT)
        ids = [torch.tensor([*e.ids, end], dtype=torch.int32) for e in tokenizer.encode_batch(documents)]
        tokens = torch.cat(ids) if ids else torch.empty(0, dtype=torch.int32)
        if len(tokens) < self.window:
            raise JobError(
                f"gpt corpus {path!r} gives {len(tokens)} tokens, fewer than one window of {self.window}"
            )
        cfg = self.config
        return evaluate_windows(
            model, held_out_windows(tokens, self.window, cfg.batch_size, _EVAL_SEED, cfg.eval_batches)
        )

    def probe_batches(self) -> list[Batch]:
        """A few fixed held-out batches on which the aggregator weighs each delta."""
        if self._probe is None:
            self._probe = self._held_out(_PROBE_SEED, PROBE_BATCHES)
        xs, ys = self._probe
        return list(zip(xs, ys, strict=True))

    def generate(
        self, model: nn.Module, prompt: str, tokens: int, *, temperature: float = 0.8, seed: int = 0
    ) -> str:
        """``prompt`` and up to ``tokens`` more tokens sampled from ``model``, as text."""
        tokenizer = self.data().tokenizer
        end = tokenizer.token_to_id(END_OF_TEXT)
        ids = tokenizer.encode(prompt).ids or [end]
        more = continue_ids(
            model,
            ids,
            tokens,
            self.config.shape[3],
            temperature=temperature,
            seed=seed,
            stop=lambda token: token == end,
        )
        return prompt + str(tokenizer.decode(more))

    def _held_out(self, seed: int, batches: int) -> Batch:
        return held_out_windows(self.data().eval, self.window, self.batch_size, seed, batches)


def make_job(**kwargs: Any) -> GPTJob:
    """Factory behind ``--job gpt``: keyword arguments are the ``--job-arg`` knobs."""
    known = [f.name for f in fields(GPTConfig)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise JobError(f"unknown gpt argument {unknown[0]!r}: known are {', '.join(known)}")
    return GPTJob(GPTConfig(**kwargs))


@dataclass(frozen=True)
class _Data:
    """The tokenizer, the training documents' token ids and the held-out token stream."""

    tokenizer: Any
    train: list[torch.Tensor]
    eval: torch.Tensor


@functools.lru_cache(maxsize=4)
def _load_data(config: GPTConfig, files: tuple[str, ...]) -> _Data:
    """Read the documents, train (or read) the tokenizer, encode: once per configuration."""
    documents = _documents(list(files), config)
    held = [d for i, d in enumerate(documents) if i % config.eval_every == config.eval_every - 1]
    train = [d for i, d in enumerate(documents) if i % config.eval_every != config.eval_every - 1]
    if not held or not train:  # too few documents to hold whole ones out: the last tenth
        whole = "\n".join(documents)
        cut = len(whole) - max(1, len(whole) // 10)
        train, held = [whole[:cut]], [whole[cut:]]
    tokenizer = _tokenizer(config, train)
    end = tokenizer.token_to_id(END_OF_TEXT)

    def ids(texts: list[str]) -> list[torch.Tensor]:
        return [torch.tensor([*e.ids, end], dtype=torch.int32) for e in tokenizer.encode_batch(texts)]

    train_ids, eval_ids = ids(train), torch.cat(ids(held))
    n = config.shape[3] + 1
    if sum(len(t) for t in train_ids) < n or len(eval_ids) < n:
        raise JobError(
            f"gpt corpus gives {sum(len(t) for t in train_ids)} training and {len(eval_ids)} held-out "
            f"tokens, fewer than one window of context+1={n}: use more text or a smaller context"
        )
    return _Data(tokenizer, train_ids, eval_ids)


def _tokenizer(config: GPTConfig, documents: list[str]) -> Any:
    """Byte-level BPE of ``vocab`` ids trained on ``documents``, or read from ``config.tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    vocab = config.shape[4]
    if config.tokenizer is not None:
        path = os.path.expanduser(config.tokenizer)
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type for bad files
            raise JobError(f"gpt tokenizer {path!r} cannot be read: {str(e)[:200]}") from None
        if tokenizer.get_vocab_size() > vocab or tokenizer.token_to_id(END_OF_TEXT) is None:
            raise JobError(
                f"gpt tokenizer {path!r} has {tokenizer.get_vocab_size()} ids (the model has {vocab}) "
                f"or no {END_OF_TEXT}: use the tokenizer.json saved with the run"
            )
        return tokenizer
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def _documents(files: list[str], cfg: GPTConfig) -> list[str]:
    """The corpus's non-empty documents in order, at most ``max_bytes`` of text in all."""
    documents: list[str] = []
    budget = cfg.max_bytes
    for path in files:
        if budget <= 0:
            break
        for text in _read(path, cfg.text_field):
            if text:
                documents.append(text[:budget])
                budget -= len(text)
                if budget <= 0:
                    break
    if not documents:
        raise JobError(f"gpt corpus {cfg.corpus!r} holds no text")
    return documents


def _read(path: str, field: str) -> Iterator[str]:
    """The documents of one corpus file, by its extension: Parquet, JSONL or plain text."""
    try:
        if path.endswith(".parquet"):
            yield from _read_parquet(path, field)
        elif path.endswith((".jsonl", ".ndjson")):
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        yield _field(_json(line, path, number), field, f"{path} line {number}")
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
    except OSError as e:
        raise JobError(f"gpt cannot read corpus file {path!r}: {e}") from None


def _read_parquet(path: str, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for a file that is not Parquet
        raise JobError(f"gpt corpus file {path!r} is not a readable Parquet file: {str(e)[:200]}") from None
    names = table.schema_arrow.names
    if field not in names:
        raise JobError(
            f"gpt corpus file {path!r} has no column {field!r} (columns: {', '.join(names)[:200]}): "
            "pass --job-arg text_field=NAME"
        )
    for batch in table.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value)


def _json(line: str, path: str, number: int) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        raise JobError(f"gpt corpus file {path!r} line {number} is not JSON") from None


def _field(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise JobError(f"gpt corpus {where} has no text field {field!r}: pass --job-arg text_field=NAME")
    return str(record[field])
