"""Compressed downlink: the published version is the base moved by the decoded update, and the
residual makes the published model track the merged one."""

from __future__ import annotations

import pytest
import torch

from coordinator.merging.downlink import lossy, publish, read_residual
from serialization import apply_update, loads


def test_the_published_version_is_exactly_what_a_volunteer_rebuilds_from_the_update():
    base = {"w": torch.randn(64, 64), "count": torch.tensor([3])}
    merged = {"w": base["w"] + 0.01 * torch.randn(64, 64), "count": torch.tensor([4])}
    expected = merged["w"].clone()  # publish forms the change and the residual in merged's storage
    publication = publish(base, merged, None, "int8", {"version": 1})
    update = publication.update.gather()
    left = publication.residual.gather()
    published = publication.version
    rebuilt = apply_update(base, loads(update)[0])
    assert torch.equal(rebuilt["w"], published["w"]) and torch.equal(rebuilt["count"], torch.tensor([4]))
    # int8 is lossy: what it left out is the residual, so version + residual is the merged model
    assert not torch.equal(published["w"], base["w"] + 0.01)
    assert torch.allclose(published["w"] + read_residual(left)["w"], expected, atol=1e-6)


def test_the_residual_keeps_the_published_model_on_the_sum_of_the_merged_steps():
    """Each round merges onto the published version; what the codec dropped must not be lost."""
    gen = torch.Generator().manual_seed(0)
    steps = [0.01 * torch.randn(64, 64, generator=gen) for _ in range(30)]
    ideal = sum(steps)
    errors = {}
    for carried in (True, False):
        published, residual = {"w": torch.zeros(64, 64)}, None
        for step in steps:
            merged = {"w": published["w"] + step}  # the round's merge, on the published version
            publication = publish(published, merged, residual, "topk:0.05", {})
            publication.update.gather()
            left = publication.residual.gather()
            published = publication.version
            residual = read_residual(left) if carried else None
        errors[carried] = float((published["w"] - ideal).norm() / ideal.norm())
    assert errors[True] < 0.5 * errors[False], errors


def test_only_lossy_specs_publish_updates():
    assert lossy("int8") and lossy("topk:0.01+int2") and not lossy("none") and not lossy(None)


def test_a_size_policy_publishes_small_tensors_exactly_and_large_ones_by_its_codec():
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 64, generator=gen), "b": torch.randn(64, generator=gen)}
    merged = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    assert lossy("topk:0.01+int2@4096")
    expected_b = base["b"] + (merged["b"] - base["b"])
    publication = publish(base, merged, None, "topk:0.01+int2@4096", {"version": 1})
    publication.update.gather()
    left = publication.residual.gather()
    published = publication.version
    assert torch.equal(published["b"], expected_b)  # 64 < 4096: lossless
    assert float(read_residual(left)["b"].abs().max()) == 0.0
    assert float(read_residual(left)["w"].abs().max()) > 0.0  # 4096: top-k, the rest carried


def test_the_residual_cannot_be_read_before_its_update_has_been_written():
    base = {"w": torch.zeros(1000)}
    publication = publish(base, {"w": torch.randn(1000)}, None, "topk:0.01+int2", {})
    with pytest.raises(RuntimeError, match="before its update"):
        publication.residual.gather()


def test_publishing_a_bf16_model_moves_it_as_a_volunteer_does():
    base = {"w": torch.randn(300, 70).to(torch.bfloat16), "b": torch.randn(70)}
    merged = {k: v.float() + 0.02 * torch.randn(v.shape) for k, v in base.items()}
    merged["w"] = merged["w"].to(torch.bfloat16)
    publication = publish(base, merged, None, "topk:0.01+int2", {})
    rebuilt = apply_update(base, loads(publication.update.gather())[0])
    assert publication.complete()
    for name in base:
        assert publication.version[name].dtype == base[name].dtype
        assert torch.equal(rebuilt[name], publication.version[name])


def test_moving_the_base_in_place_publishes_the_same_version_in_the_base_storage():
    gen = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(100, 300, generator=gen), "n": torch.tensor([1])}
    step = {"w": 0.01 * torch.randn(100, 300, generator=gen), "n": torch.tensor([2])}
    copied = publish(base, {"w": base["w"] + step["w"], "n": step["n"]}, None, "topk:0.01+int2", {})
    update = copied.update.gather()
    moved_base = {k: v.clone() for k, v in base.items()}
    storage = moved_base["w"].data_ptr()
    moved = publish(moved_base, {"w": base["w"] + step["w"], "n": step["n"]}, None, "topk:0.01+int2", {},
                    move_base=True)  # fmt: skip
    assert moved.update.gather() == update
    assert moved.version["w"].data_ptr() == storage
    assert all(torch.equal(moved.version[k], copied.version[k]) for k in base)
    assert torch.equal(apply_update(base, loads(update)[0])["w"], moved.version["w"])
