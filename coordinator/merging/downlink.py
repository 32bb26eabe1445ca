"""Compressed downlink (``init --downlink-compression SPEC``): versions published as encoded updates.

A volunteer that holds version v should not fetch all of version v+1: the
aggregator also publishes v+1 as an update from v, encoded with a lossy codec,
and *defines* version v+1 as v plus the decoded update (``apply_update``, the
same float32 arithmetic on every machine), so a volunteer rebuilding it from
the updates holds the published model bit for bit. What the codec leaves out
is kept (the downlink residual, in Redis) and added to the next update: error
feedback, as on the uplink, so the published model tracks the merged one.

Memory: ``publish`` works tensor by tensor inside the merged model's own
storage. The change (merged - base + residual) is formed in place, each tensor
is decoded as it is encoded (while the update is written), the version moves by
it and what was not sent stays behind in the same storage as the new residual,
which is then written from there. Besides the base and the merged model, the
aggregator holds the version being built and one tensor's decoding: no
model-sized update, decoding or residual copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from serialization import Codec, Encoded, TensorDict, dumps_stream, loads, parse_codec

__all__ = ["Publication", "lossy", "publish", "read_residual"]


def lossy(spec: str | None) -> bool:
    """True when versions are worth publishing as updates (a lossless update is the model's size)."""
    return spec is not None and parse_codec(spec).lossy


@dataclass
class Publication:
    """A version published as an update: write ``update``, then ``residual``; then ``version`` is whole.

    Reading ``update`` (a stream) decodes each tensor as it is encoded: that
    moves ``version`` and leaves the new residual in the merged model's storage,
    which ``residual`` then streams out. ``residual`` refuses to be read before
    ``update`` has been read whole.
    """

    update: Encoded
    residual: Encoded
    version: TensorDict
    _pending: set[str] = field(default_factory=set)

    def complete(self) -> bool:
        """True once every tensor of the update has been encoded (and decoded into ``version``)."""
        return not self._pending


def publish(
    base: Mapping[str, torch.Tensor],
    merged: dict[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor] | None,
    codec: str | Codec,
    meta: Mapping,
    *,
    move_base: bool = False,
) -> Publication:
    """The version to publish, its update and the new residual, formed in ``merged``'s storage.

    The update carries ``merged - base + residual`` for floating tensors and
    the new value of the others; the version published is ``base`` moved by
    the decoded update (exactly as ``apply_update`` moves it), and the residual
    what the decoding missed. ``merged`` is consumed: its float32 tensors
    become the change, then the residual. ``residual`` is only read here (the
    caller may drop it as soon as this returns). With ``move_base`` the version
    is formed in ``base``'s own float32 tensors (the same float32 sums), which
    then hold the version: no third model beside the base and the change.
    """
    chosen = parse_codec(codec) if isinstance(codec, str) else codec
    wanted: TensorDict = {}
    version: TensorDict = {}
    for name, new in merged.items():
        if not new.is_floating_point():
            wanted[name] = new
            version[name] = new.clone()  # as apply_update: the new value itself
            continue
        change = new if new.dtype == torch.float32 and new.is_contiguous() else new.float().contiguous()
        change.sub_(base[name].float())
        carried = residual.get(name) if residual is not None else None
        if carried is not None and carried.shape == change.shape:
            change.add_(carried)
        wanted[name] = change
    pending = {name for name, tensor in wanted.items() if tensor.is_floating_point()}
    exact: set[str] = set()

    def move(name: str, used: Codec, fields: dict[str, np.ndarray]) -> None:
        if name not in pending:
            return
        change, old = wanted[name], base[name]
        pending.discard(name)
        if not used.lossy:  # sent exactly: its fields are ``change`` itself, not yet read
            version[name] = _moved(old, change, move_base)
            exact.add(name)  # nothing left out: zeroed once the update is written
            return
        views = {key: array.data for key, array in fields.items()}
        decoded = used.decode(views, change.numel(), torch.float32).view(change.shape)
        version[name] = _moved(old, decoded, move_base)
        change.sub_(decoded)  # what the codec left out: the next residual

    update = dumps_stream(wanted, meta, chosen, move)
    floats = {name: wanted[name] for name in wanted if wanted[name].is_floating_point()}
    left = dumps_stream(floats, {"downlink_residual": True})
    publication = Publication(update, left, version, pending)
    publication.residual = Encoded(left.size, _after(publication, exact, floats, left.pieces))
    return publication


def _moved(old: torch.Tensor, decoded: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``old`` moved by a decoded change as ``apply_update`` moves it (in ``old``: if asked, float32)."""
    if in_place and old.dtype == torch.float32:
        return old.add_(decoded)
    return (old.float() + decoded).to(old.dtype)


def _after(
    publication: Publication, exact: set[str], floats: TensorDict, pieces: Iterator[memoryview]
) -> Iterator[memoryview]:
    """The residual's bytes, once the update has been read whole (before, the residual is not done)."""
    if not publication.complete():
        raise RuntimeError("the downlink residual was read before its update was written")
    for name in exact:  # sent whole: nothing of it is left for the next update
        floats[name].zero_()
    yield from pieces


def read_residual(blob: bytes | bytearray | None) -> TensorDict | None:
    return loads(blob)[0] if blob else None
