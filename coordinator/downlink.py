"""Compressed downlink (``init --downlink-compression SPEC``): versions published as encoded updates.

A volunteer that holds version v should not fetch all of version v+1: the
aggregator also publishes v+1 as an update from v, encoded with a lossy codec,
and *defines* version v+1 as v plus the decoded update (``apply_update``, the
same float32 arithmetic on every machine), so a volunteer rebuilding it from
the updates holds the published model bit for bit. What the codec leaves out
is kept (the downlink residual, in Redis) and added to the next update: error
feedback, as on the uplink, so the published model tracks the merged one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from serialization import TensorDict, apply_update, dumps, loads, parse_codec


def lossy(spec: str | None) -> bool:
    """True when versions are worth publishing as updates (a lossless update is the model's size)."""
    return spec is not None and parse_codec(spec).lossy


def publish(
    base: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor] | None,
    codec: str,
    meta: Mapping,
) -> tuple[TensorDict, bytes, bytes]:
    """(the version to publish, its update's bytes, the new residual's bytes).

    The update carries ``merged - base + residual`` for floating tensors and
    the new value of the others; the version published is ``base`` moved by
    the decoded update, and the residual what the decoding missed.
    """
    wanted: TensorDict = {}
    for name, new in merged.items():
        if not new.is_floating_point():
            wanted[name] = new
            continue
        change = new.float() - base[name].float()
        carried = residual.get(name) if residual is not None else None
        if carried is not None and carried.shape == change.shape:
            change += carried
        wanted[name] = change
    update = dumps(wanted, meta, codec)
    decoded, _ = loads(update)
    left = {name: wanted[name] - decoded[name].float() for name in wanted if wanted[name].is_floating_point()}
    return apply_update(base, decoded), update, dumps(left, {"downlink_residual": True})


def read_residual(blob: bytes | bytearray | None) -> TensorDict | None:
    return loads(blob)[0] if blob else None
