"""``evaluate_corpus``: a language job's metrics on text at a path (``coordinator evaluate --data``)."""

from __future__ import annotations

import pytest

from jobs import JobError, load_job
from tests.jobs.test_gpt import SMALL, _prose

CHARLM = {"layers": 1, "width": 16, "heads": 2, "context": 16, "max_files": 10, "eval_batches": 2}


@pytest.mark.parametrize(("name", "args"), [("charlm", CHARLM), ("gpt", SMALL)])
def test_a_language_job_evaluates_the_text_at_a_path_and_names_a_path_with_too_little(tmp_path, name, args):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(_prose(i))
    other = tmp_path / "other.txt"
    other.write_text("x = 1\n" * 200)
    job = load_job(name, {**args, "corpus": str(corpus / "*.txt")})
    model = job.build_model()

    prose = job.evaluate_corpus(model, str(corpus))
    code = job.evaluate_corpus(model, str(other))

    assert set(prose) == {"eval_loss", "eval_accuracy"} and prose["eval_loss"] > 0
    assert prose != code  # other text, other windows
    assert job.evaluate_corpus(model, str(corpus)) == prose  # fixed windows: the same number again
    with pytest.raises(JobError):
        job.evaluate_corpus(model, str(tmp_path / "nothing-here"))
