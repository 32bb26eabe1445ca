"""Compressed downlink: the published version is the base moved by the decoded update, and the
residual makes the published model track the merged one."""

from __future__ import annotations

import torch

from coordinator.downlink import lossy, publish, read_residual
from serialization import apply_update, loads


def test_the_published_version_is_exactly_what_a_volunteer_rebuilds_from_the_update():
    base = {"w": torch.randn(64, 64), "count": torch.tensor([3])}
    merged = {"w": base["w"] + 0.01 * torch.randn(64, 64), "count": torch.tensor([4])}
    published, update, _ = publish(base, merged, None, "int8", {"version": 1})
    rebuilt = apply_update(base, loads(update)[0])
    assert torch.equal(rebuilt["w"], published["w"]) and torch.equal(rebuilt["count"], torch.tensor([4]))
    assert not torch.equal(published["w"], merged["w"])  # int8 is lossy: the residual keeps the rest


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
            published, _, left = publish(published, merged, residual, "topk:0.05", {})
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
    published, _, left = publish(base, merged, None, "topk:0.01+int2@4096", {"version": 1})
    assert torch.equal(published["b"], base["b"] + (merged["b"] - base["b"]))  # 64 < 4096: lossless
    assert float(read_residual(left)["b"].abs().max()) == 0.0
    assert float(read_residual(left)["w"].abs().max()) > 0.0  # 4096: top-k, the rest carried
