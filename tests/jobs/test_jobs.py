"""Tests for jobs: the job interface, loading, job args, and the charlm job."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch

from jobs import BUILTIN_JOBS, JobError, batch_size, load_job, parse_job_args
from jobs.charlm import CharLMJob, make_job

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def fixture_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the small job modules in tests/fixtures importable by bare name."""
    monkeypatch.syspath_prepend(str(FIXTURES))


@pytest.fixture
def corpus(tmp_path: pathlib.Path) -> str:
    """Twelve small, distinct text files; returns their glob."""
    for i in range(12):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i} says " + "abcdefgh" * (10 + i))
    return str(tmp_path / "*.txt")


def tiny(corpus: str | None = None, **overrides: object) -> CharLMJob:
    """A charlm small enough to train in milliseconds."""
    knobs: dict[str, object] = {
        "layers": 1,
        "width": 16,
        "heads": 2,
        "context": 8,
        "batch_size": 4,
        "eval_batches": 2,
        "corpus": corpus,
    }
    knobs.update(overrides)
    return make_job(**knobs)


# --- charlm: model ---------------------------------------------------------------------


def test_charlm_same_seed_gives_identical_initial_weights(corpus: str) -> None:
    a, b = tiny(corpus, seed=3).build_model(), tiny(corpus, seed=3).build_model()

    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_charlm_different_seed_gives_different_initial_weights(corpus: str) -> None:
    a, b = tiny(corpus, seed=0).build_model(), tiny(corpus, seed=1).build_model()

    assert not torch.equal(a.state_dict()["tok.weight"], b.state_dict()["tok.weight"])


def test_charlm_build_model_leaves_the_global_rng_untouched(corpus: str) -> None:
    job = tiny(corpus)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)

    job.build_model()

    assert torch.equal(torch.rand(3), expected)


def test_charlm_initial_eval_loss_is_near_uniform_over_bytes() -> None:
    job = make_job(layers=1, width=32, heads=2, context=32, max_bytes=100_000)

    metrics = job.evaluate(job.build_model())

    assert abs(metrics["eval_loss"] - math.log(256)) < 0.2
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


# --- charlm: data ----------------------------------------------------------------------


def test_charlm_shards_are_disjoint_by_file_and_cover_the_training_files(corpus: str) -> None:
    job = tiny(corpus)
    train = {name for name, _ in job.corpus().train}

    shards = [set(job.shard_files(i, 3)) for i in range(3)]

    assert all(shards)
    assert sum(len(s) for s in shards) == len(train)
    assert set().union(*shards) == train


def test_charlm_holds_every_tenth_file_out_of_training(corpus: str) -> None:
    job = tiny(corpus)

    train = [pathlib.Path(name).name for name, _ in job.corpus().train]

    assert "f09.txt" not in train
    assert len(train) == 11
    assert len(job.corpus().eval) > 0


def test_charlm_every_shard_yields_batches_when_shards_outnumber_files(corpus: str) -> None:
    job = tiny(corpus)

    for index in range(40):
        x, y = next(iter(job.shard(index, 40)))

        assert x.shape == y.shape == (4, 8)


def test_charlm_shard_batches_are_byte_windows_with_shifted_targets(corpus: str) -> None:
    job = tiny(corpus)

    x, y = next(iter(job.shard(0, 2)))

    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 256


def test_charlm_shard_batches_follow_the_global_rng(corpus: str) -> None:
    job = tiny(corpus)

    torch.manual_seed(1)
    first = next(iter(job.shard(0, 2)))[0]
    torch.manual_seed(1)
    again = next(iter(job.shard(0, 2)))[0]
    torch.manual_seed(2)
    other = next(iter(job.shard(0, 2)))[0]

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_charlm_shard_rejects_an_index_outside_the_count(corpus: str) -> None:
    with pytest.raises(ValueError, match="outside"):
        tiny(corpus).shard_text(3, 3)


def test_charlm_falls_back_to_held_out_bytes_when_files_are_few(tmp_path: pathlib.Path) -> None:
    (tmp_path / "only.txt").write_text("hello world " * 50)

    job = tiny(str(tmp_path / "*.txt"))

    assert len(job.corpus().eval) >= 9
    assert job.evaluate(job.build_model())["eval_loss"] > 0


# --- charlm: evaluation and training ---------------------------------------------------


def test_charlm_evaluate_is_deterministic_and_restores_train_mode(corpus: str) -> None:
    job = tiny(corpus)
    model = job.build_model().train()

    first, second = job.evaluate(model), job.evaluate(model)

    assert first == second
    assert set(first) == {"eval_loss", "eval_accuracy"}
    assert model.training


def test_charlm_a_few_local_steps_lower_the_eval_loss() -> None:
    job = make_job(layers=1, width=32, heads=2, context=32, max_bytes=200_000)
    model = job.build_model()
    before = job.evaluate(model)["eval_loss"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    batches = iter(job.shard(0, 2))

    for _ in range(15):
        loss = job.loss(model, next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()

    assert job.evaluate(model)["eval_loss"] < before - 0.5


# --- charlm: arguments -----------------------------------------------------------------


def test_charlm_rejects_an_unknown_argument_naming_the_known_ones() -> None:
    with pytest.raises(JobError, match=r"unknown charlm argument 'depth'.*layers"):
        make_job(depth=3)


@pytest.mark.parametrize(
    "knobs, fragment",
    [
        ({"layers": 0}, "layers must be an integer >= 1"),
        ({"width": "wide"}, "width must be an integer"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"width": 30, "heads": 4}, "divisible by heads"),
        ({"eval_every": 1}, "eval_every"),
    ],
)
def test_charlm_rejects_bad_values_naming_the_knob(knobs: dict, fragment: str) -> None:
    with pytest.raises(JobError, match=fragment):
        make_job(**knobs)


def test_charlm_rejects_a_corpus_glob_that_matches_nothing(tmp_path: pathlib.Path) -> None:
    with pytest.raises(JobError, match="matches no files"):
        make_job(corpus=str(tmp_path / "*.nothing"))


# --- parse_job_args --------------------------------------------------------------------


@pytest.mark.parametrize(
    "pair, expected",
    [
        ("layers=4", 4),
        ("lr=0.5", 0.5),
        ("flag=true", True),
        ('name="quoted"', "quoted"),
        ("name=hello", "hello"),
        ("corpus=/data/*.txt", "/data/*.txt"),
        ("sizes=[1, 2]", [1, 2]),
        ("empty=", ""),
        ("expr=a=b", "a=b"),
    ],
)
def test_parse_job_args_parses_json_values_else_keeps_strings(pair: str, expected: object) -> None:
    key = pair.split("=", 1)[0]

    assert parse_job_args([pair]) == {key: expected}


def test_parse_job_args_later_pairs_override_earlier_ones() -> None:
    assert parse_job_args(["layers=2", "width=8", "layers=3"]) == {"layers": 3, "width": 8}


@pytest.mark.parametrize("pair", ["layers", "=4", " =4", "1x=2"])
def test_parse_job_args_rejects_malformed_pairs_naming_them(pair: str) -> None:
    with pytest.raises(JobError, match="malformed --job-arg") as info:
        parse_job_args([pair])

    assert repr(pair) in str(info.value)
    assert "key=value" in str(info.value)


# --- load_job --------------------------------------------------------------------------


def test_load_job_builds_a_builtin_with_its_arguments() -> None:
    job = load_job("charlm", {"layers": 1, "width": 16, "heads": 2})

    assert "charlm" in BUILTIN_JOBS
    assert job.name == "charlm"
    assert job.config.layers == 1


def test_load_job_builds_a_job_from_an_import_path(fixture_jobs: None) -> None:
    job = load_job("jobs_tiny:make_job", {"features": 3})

    assert job.name == "tiny"
    assert job.features == 3


@pytest.mark.parametrize(
    "name, fragment",
    [
        (
            "foo",
            "unknown job 'foo': use a built-in (charlm, gpt) or an import path package.module:factory",
        ),
        (":make_job", "malformed job path"),
        ("jobs_tiny:", "malformed job path"),
        ("bad name:make", "malformed job path"),
        ("no_such_module_for_crowdtrain:make", "cannot import job module"),
        ("jobs_tiny:no_such_factory", "has no factory 'no_such_factory'"),
        ("jobs_tiny:not_callable", "is not callable"),
        ("jobs_tiny:make_not_a_job", "lacks name, build_model"),
    ],
)
def test_load_job_names_the_problem_and_the_fix(fixture_jobs: None, name: str, fragment: str) -> None:
    with pytest.raises(JobError) as info:
        load_job(name)

    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_load_job_reports_arguments_the_factory_rejects(fixture_jobs: None) -> None:
    with pytest.raises(JobError, match=r"rejected its arguments.*bogus"):
        load_job("jobs_tiny:make_job", {"bogus": 1})


def test_load_job_reports_bad_builtin_arguments() -> None:
    with pytest.raises(JobError, match="depth"):
        load_job("charlm", {"depth": 3})


def test_load_job_refuses_a_job_off_the_allow_list() -> None:
    with pytest.raises(JobError) as info:
        load_job("jobs_tiny:make_job", allowed=["charlm"])

    assert str(info.value) == (
        "job 'jobs_tiny:make_job' is not on this volunteer's allow-list (--allow-job); allowed: charlm"
    )


def test_load_job_refusal_does_not_import_the_module(
    fixture_jobs: None, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    marker = tmp_path / "imported"
    monkeypatch.setenv("CROWDTRAIN_TEST_MARKER", str(marker))
    monkeypatch.delitem(sys.modules, "jobs_marker", raising=False)

    with pytest.raises(JobError, match="allow-list"):
        load_job("jobs_marker:make_job", allowed=["charlm"])

    assert not marker.exists()
    assert "jobs_marker" not in sys.modules


def test_load_job_imports_a_job_on_the_allow_list(
    fixture_jobs: None, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    marker = tmp_path / "imported"
    monkeypatch.setenv("CROWDTRAIN_TEST_MARKER", str(marker))
    monkeypatch.delitem(sys.modules, "jobs_marker", raising=False)

    job = load_job("jobs_marker:make_job", allowed=["charlm", "jobs_marker:make_job"])

    assert job.name == "marker"
    assert marker.exists()
    sys.modules.pop("jobs_marker", None)


# --- batch_size: the cap on a shard's samples --------------------------------------------
class _NoBatchSize:
    name = "plain"


def test_a_job_without_batch_size_counts_one_sample_per_step():
    assert batch_size(_NoBatchSize()) == 1
    assert batch_size(make_job(layers=1, width=8, heads=2, context=8, batch_size=5)) == 5


# --- local data: a volunteer's own text ---------------------------------------------------
def test_charlm_reads_a_volunteers_own_text_from_a_file_folder_or_glob(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_bytes(b"abcdefgh" * 64)
    job = make_job(layers=1, width=8, heads=2, context=8, batch_size=4)
    for path in (tmp_path / "mine", tmp_path / "mine" / "a.txt", str(tmp_path / "mine" / "*.txt")):
        x, y = next(iter(job.local_shard(str(path))))
        assert x.shape == (4, 8) and set(x.flatten().tolist()) <= set(b"abcdefgh")
        assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(JobError, match="fewer than one window"):
        job.local_shard(str(tmp_path / "nothing-here"))
