"""The ``gpt`` job: GPT-2-shaped presets, tied head, rotary positions, corpora, tokenizer, text."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import JobError, load_job
from jobs.gpt import GPT, GPTConfig, _load_data
from jobs.transformer import _rotate, rotary_tables

SMALL = {"layers": 1, "width": 32, "heads": 2, "context": 32, "vocab": 300, "max_files": 12}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
WORDS += ["while", "volunteers", "train", "one", "model"]


def _prose(seed: int, words: int = 400) -> str:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (words,), generator=gen)
    return " ".join(WORDS[i] for i in picks) + "."


@pytest.mark.parametrize(("preset", "low", "high"), [("nano", 0.8e6, 1.5e6), ("small", 120e6, 130e6)])
def test_presets_span_a_million_to_gpt2_small(preset, low, high):
    with torch.device("meta"):  # the shape only: no memory for 124M parameters
        model = GPT(GPTConfig(preset=preset))
    assert low <= sum(p.numel() for p in model.parameters()) <= high


def test_the_output_head_is_the_token_embedding_one_tensor_one_name():
    job = load_job("gpt", SMALL)
    model = job.build_model()
    names = set(model.state_dict())
    assert "tok.weight" in names and not any(name.startswith("head") for name in names)
    x, y = next(job.shard(0, 2))
    job.loss(model, (x, y)).backward()
    # the embedding gets gradient for rows never seen as inputs: it is the output projection too
    unseen = sorted(set(range(300)) - set(x.flatten().tolist()))
    assert unseen and model.tok.weight.grad[unseen].abs().sum() > 0


def test_rotary_positions_add_no_weights_and_depend_only_on_relative_position():
    model = load_job("gpt", {**SMALL, "positions": "rotary"}).build_model()
    assert not any(name.startswith(("pos", "rotary")) for name in model.state_dict())
    cos, sin = rotary_tables(16, 8)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)

    def score(m: int, n: int) -> float:
        return float(_rotate(q, cos[m], sin[m]) @ _rotate(k, cos[n], sin[n]))

    assert score(5, 2) == pytest.approx(score(12, 9), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_a_few_steps_lower_the_held_out_loss_and_shards_stay_in_the_vocabulary():
    job = load_job("gpt", SMALL)
    model = job.build_model()
    before = job.evaluate(model)["eval_loss"]
    assert before == pytest.approx(torch.log(torch.tensor(300.0)).item(), rel=0.05)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = job.shard(1, 3)
    for _ in range(30):
        x, y = next(batches)
        assert x.shape == (job.batch_size, 32) and int(x.max()) < 300
        optimizer.zero_grad()
        job.loss(model, (x, y)).backward()
        optimizer.step()
    assert job.evaluate(model)["eval_loss"] < before - 0.5


def _corpus(tmp_path, kind: str, field: str = "text") -> str:
    folder = tmp_path / kind
    folder.mkdir()
    docs = [_prose(i) for i in range(24)]
    if kind == "jsonl":
        for part in range(2):
            lines = [json.dumps({field: d, "id": i}) for i, d in enumerate(docs[part::2])]
            (folder / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")
        return str(folder / "*.jsonl")
    if kind == "parquet":
        pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), folder / "docs.parquet")
        return str(folder / "*.parquet")
    for i, d in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(d)
    return str(folder / "*.txt")


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet"])
def test_corpora_from_text_jsonl_and_parquet_give_the_same_documents(tmp_path, kind):
    field = "body" if kind != "text" else "text"
    corpus = _corpus(tmp_path, kind, field)
    job = load_job("gpt", {**SMALL, "corpus": corpus, "text_field": field, "max_files": 100})
    data = job.data()
    # 24 documents: every 10th held out, the others dealt to shards
    assert len(data.train) == 22 and len(data.eval) > 0
    tokenizer = data.tokenizer
    assert tokenizer.decode(tokenizer.encode(WORDS[0] + " " + WORDS[1]).ids) == "the quick"
    assert job.evaluate(job.build_model())["eval_loss"] > 0


def test_the_tokenizer_is_the_same_when_trained_again_and_when_read_from_its_file(tmp_path):
    corpus = _corpus(tmp_path, "text")
    first = load_job("gpt", {**SMALL, "corpus": corpus}).tokenizer_json()
    _load_data.cache_clear()
    assert load_job("gpt", {**SMALL, "corpus": corpus}).tokenizer_json() == first
    saved = tmp_path / "tokenizer.json"
    saved.write_text(first)
    _load_data.cache_clear()
    again = load_job("gpt", {**SMALL, "corpus": corpus, "tokenizer": str(saved)})
    assert again.tokenizer_json() == first


def test_generate_continues_the_prompt_repeatably():
    job = load_job("gpt", SMALL)
    model = job.build_model()
    text = job.generate(model, "def main(", 12, seed=3)
    assert text.startswith("def main(") and len(text) > len("def main(")
    assert job.generate(model, "def main(", 12, seed=3) == text
    assert job.generate(model, "def main(", 12, temperature=0) == job.generate(
        model, "def main(", 12, temperature=0
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"corpus": "/nonexistent/*.txt"}, ["matches no files", "corpus="]),
        ({"preset": "huge"}, ["preset", "nano"]),
        ({"positions": "sinusoid"}, ["positions"]),
        ({"width": 30, "heads": 4}, ["divisible"]),
        ({"colour": 1}, ["colour"]),
    ],
)
def test_bad_arguments_are_one_job_error_naming_the_fix(args, words):
    with pytest.raises(JobError) as caught:
        load_job("gpt", {**SMALL, **args}).data()
    for word in words:
        assert word in str(caught.value)


def test_a_parquet_file_without_the_text_field_names_its_columns(tmp_path):
    job = load_job("gpt", {**SMALL, "corpus": _corpus(tmp_path, "parquet", field="body")})
    with pytest.raises(JobError, match=r"no column 'text' \(columns: body, id\).*text_field=NAME"):
        job.data()


def test_a_jsonl_record_without_the_text_field_names_file_and_line(tmp_path):
    job = load_job("gpt", {**SMALL, "corpus": _corpus(tmp_path, "jsonl", field="body")})
    with pytest.raises(JobError, match=r"part0.jsonl line 1 has no text field 'text'"):
        job.data()
