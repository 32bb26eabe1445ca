"""Delta codecs: how one tensor's values become the byte fields of the wire format.

A codec turns a flat CPU tensor into named little-endian byte fields and back.
Lossy codecs only ever see floating tensors (``wire`` sends the rest as
``none``); they compute in float32 and the wire casts the result back to the
tensor's declared dtype. The error and ratio each docstring states are for a
float32 tensor of i.i.d. normal values (the tests check them on 1M of those):
relative L2 error ``|decoded - x| / |x|`` and ratio ``4 * n / encoded bytes``.

Spec grammar (``--compression``, ``--downlink-compression``)::

    SPEC   := CODEC | CODEC@N | CODEC@N:SMALL
    CODEC  := none | fp16 | bf16 | int8 | topk:F | topk:F+int8 | topk:F+int4 | topk:F+int2
    SMALL  := none | fp16 | bf16 | int8                      (default none)

``CODEC@N`` is a size policy (as hivemind's SizeAdaptiveCompression): a
floating tensor of fewer than N elements (a bias, a norm gain, a small
model's whole state) goes SMALL, the rest CODEC. Top-k of a 17-element block
keeps one value, and 2-bit codes of a few entries with error feedback
overshoot; a dense small tensor costs little. A policy is not a tensor codec:
each tensor header carries the concrete codec the policy picked for it
(``Codec.for_tensor``), so a policy adds no bytes of its own to the wire.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from statistics import NormalDist

import numpy as np
import torch

from . import kernels
from .errors import UnknownCodec

__all__ = ["CODECS", "Codec", "SizePolicy", "parse_codec"]

Fields = dict[str, np.ndarray]
VALID_SPECS = (
    "none, fp16, bf16, int8, topk:F, topk:F+int8, topk:F+int4 or topk:F+int2 with 0 < F <= 1 "
    "(e.g. topk:0.01+int8, topk:0.01+int2), optionally with a size policy @N[:SMALL]: tensors "
    "of fewer than N elements go SMALL (none, fp16, bf16 or int8; default none), e.g. "
    "topk:0.01+int2@4096 or topk:0.01+int2@4096:int8"
)
SMALL_CODECS = ("none", "fp16", "bf16", "int8")  # what a policy may send small tensors as
MAX_THRESHOLD = 1 << 40
TOPK_VALUES = {"+int8": 8, "+int4": 4, "+int2": 2}  # spec suffix -> bits of each sent value


class Codec:
    """One tensor codec: ``name`` is its canonical spec; the wire dispatches on it."""

    name: str = ""
    lossy: bool = True

    def field_sizes(self, n: int, itemsize: int) -> dict[str, int]:
        """Exact byte length of each field for n elements (checked before decoding)."""
        raise NotImplementedError

    def encode_into(self, x: torch.Tensor, out: Fields) -> None:
        """Encode a flat contiguous CPU tensor into uint8 arrays of exactly field_sizes bytes."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Fields:
        """Encode a flat contiguous CPU tensor into new uint8 field arrays."""
        sizes = self.field_sizes(x.numel(), x.element_size())
        out = {field: np.empty(size, np.uint8) for field, size in sizes.items()}
        self.encode_into(x, out)
        return out

    def decode(
        self, fields: Mapping[str, memoryview], n: int, dtype: torch.dtype, out: np.ndarray | None = None
    ) -> torch.Tensor:
        """Decode fields of the sizes field_sizes promised into a flat tensor of ``dtype``.

        ``out``: a float32 array of n to decode into (lossy codecs, float32 dtype).
        """
        raise NotImplementedError

    def subtract_decoded_(self, x: np.ndarray, fields: Fields) -> None:
        """x -= decode(fields), in place on float32 x: the residual that error feedback keeps."""
        dec = self.decode({k: memoryview(v.data).cast("B") for k, v in fields.items()}, x.size, torch.float32)
        np.subtract(x, dec.numpy(), out=x)

    def expected_ratio(self) -> float:
        """Compression ratio against float32 on a large tensor."""
        raise NotImplementedError

    def expected_error(self) -> float:
        """Relative L2 error on i.i.d. normal float32 values (an upper bound for tests)."""
        raise NotImplementedError

    def for_tensor(self, n: int, floating: bool) -> Codec:
        """The codec one tensor of n elements goes on the wire with: ``none`` for non-float ones."""
        return self if self.lossy and floating else NONE

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


class NoneCodec(Codec):
    """Raw bytes in the tensor's own dtype. Ratio 1, error 0; decoded zero-copy."""

    name, lossy = "none", False

    def field_sizes(self, n: int, itemsize: int) -> dict[str, int]:
        return {"data": n * itemsize}

    def encode_into(self, x: torch.Tensor, out: Fields) -> None:
        np.copyto(out["data"], x.reshape(-1).view(torch.uint8).numpy())

    def decode(
        self, fields: Mapping[str, memoryview], n: int, dtype: torch.dtype, out: np.ndarray | None = None
    ) -> torch.Tensor:
        return view_tensor(fields["data"], dtype, n)

    def subtract_decoded_(self, x: np.ndarray, fields: Fields) -> None:
        x.fill(0.0)

    def expected_ratio(self) -> float:
        return 1.0

    def expected_error(self) -> float:
        return 0.0


class HalfCodec(Codec):
    """fp16 or bf16 cast (round to nearest). Ratio 2; error 3e-4 (fp16) / 2.3e-3 (bf16).

    fp16 overflows to inf beyond 65504 and flushes below 6e-8; bf16 keeps float32's range.
    """

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype

    def field_sizes(self, n: int, itemsize: int) -> dict[str, int]:
        return {"data": 2 * n}

    def encode_into(self, x: torch.Tensor, out: Fields) -> None:
        if x.numel():  # torch will not view an empty array's bytes as halves (its stride is 0)
            torch.from_numpy(out["data"]).view(self.dtype).copy_(x.reshape(-1))

    def decode(
        self, fields: Mapping[str, memoryview], n: int, dtype: torch.dtype, out: np.ndarray | None = None
    ) -> torch.Tensor:
        half = view_tensor(fields["data"], self.dtype, n)
        if dtype != torch.float32:  # a copy even in its own dtype: only none decodes to views
            return half.to(dtype, copy=True)
        return torch.from_numpy(_out(out, n)).copy_(half)

    def expected_ratio(self) -> float:
        return 2.0

    def expected_error(self) -> float:
        return 3.5e-4 if self.dtype == torch.float16 else 2.6e-3


class Int8Codec(Codec):
    """Blockwise absmax int8, 256 values per float32 scale.

    Ratio 4 / (1 + 4/256) = 3.94; error 0.007 (block absmax of 256 normals ~ 3 sigma,
    so the rounding step is 3 sigma / 127).
    """

    name = "int8"

    def field_sizes(self, n: int, itemsize: int) -> dict[str, int]:
        return {"q": n, "scale": 4 * -(-n // kernels.BLOCK)}

    def encode_into(self, x: torch.Tensor, out: Fields) -> None:
        kernels.quantize_int8(_float32(x), out["q"].view(np.int8), out["scale"].view("<f4"))

    def decode(
        self, fields: Mapping[str, memoryview], n: int, dtype: torch.dtype, out: np.ndarray | None = None
    ) -> torch.Tensor:
        out = _out(out, n)
        kernels.dequantize_int8(_array(fields["q"], np.int8), _array(fields["scale"], "<f4"), out)
        return _cast(out, dtype)

    def subtract_decoded_(self, x: np.ndarray, fields: Fields) -> None:
        dec = np.empty(min(x.size, kernels.CHUNK), np.float32)
        q, scale = _array(fields["q"], np.int8), _array(fields["scale"], "<f4")
        step = kernels.CHUNK
        for start in range(0, x.size, step):
            stop = min(start + step, x.size)
            part = dec[: stop - start]
            kernels.dequantize_int8(q[start:stop], scale[start // kernels.BLOCK :], part)
            np.subtract(x[start:stop], part, out=x[start:stop])

    def expected_ratio(self) -> float:
        return 4 / (1 + 4 / kernels.BLOCK)

    def expected_error(self) -> float:
        return 0.0075


class SparseCodec(Codec):
    """A codec that sends some entries (indices and values) and zeros the rest."""

    def decode(
        self, fields: Mapping[str, memoryview], n: int, dtype: torch.dtype, out: np.ndarray | None = None
    ) -> torch.Tensor:
        idx, values = self._sparse(fields, n)
        out = np.zeros(n, np.float32) if out is None else out
        out.fill(0.0)
        out[idx] = values
        return _cast(out, dtype)

    def subtract_decoded_(self, x: np.ndarray, fields: Fields) -> None:
        idx, values = self._sparse(fields, x.size)
        x[idx] -= values

    def _sparse(self, fields: Mapping, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and float32 values of the sent entries."""
        raise NotImplementedError


class TopKCodec(SparseCodec):
    """The k = round(F*n) (at least 1) largest-magnitude entries, exactly k of them.

    Indices: a uint16 offset inside each 65536-element block plus a uint32 count
    per block (2 bytes per entry). Values: float32, or with ``+int8`` blockwise
    int8 over the k values (1 byte + 4/256). Ratio 4 / (6F) (66 at F=0.01) or
    4 / (3.02F) (132 at F=0.01). Error: the norm of what is left out, 0.957 at
    F=0.01 on normals (sqrt of 1 - tail energy); error feedback sends it later.
    The threshold comes from a 64K-value sample, then is made exact.
    """

    def __init__(self, fraction: float, int8_values: bool) -> None:
        self.fraction, self.int8_values = fraction, int8_values
        self.name = f"topk:{fraction!r}" + ("+int8" if int8_values else "")

    def field_sizes(self, n: int, itemsize: int) -> dict[str, int]:
        k = kernels.topk_count(self.fraction, n)
        sizes = {"idx": 2 * k, "cnt": 4 * -(-n // kernels.INDEX_BLOCK)}
        if self.int8_values:
            sizes.update(q=k, scale=4 * -(-k // kernels.BLOCK))
        else:
            sizes["val"] = 4 * k
        return sizes

    def encode_into(self, x: torch.Tensor, out: Fields) -> None:
        flat = _float32(x)
        idx = kernels.select_topk(flat, kernels.topk_count(self.fraction, flat.size))
        kernels.pack_indices(idx, flat.size, out["idx"].view("<u2"), out["cnt"].view("<u4"))
        if self.int8_values:
            kernels.quantize_int8(flat[idx], out["q"].view(np.int8), out["scale"].view("<f4"))
        else:
            np.take(flat, idx, out=out["val"].view("<f4"))

    def expected_ratio(self) -> float:
        per_entry = 3 + 4 / kernels.BLOCK if self.int8_values else 6
        return 4 / (self.fraction * per_entry + 4 / kernels.INDEX_BLOCK)

    def expected_error(self) -> float:
        kept = _kept_energy(self.fraction)
        quant = 0.02 if self.int8_values else 0.0  # int8 of the kept values, heavy-tailed
        return math.sqrt(max(0.0, 1 - kept) + kept * quant**2) + 0.002

    def _sparse(self, fields: Mapping, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and float32 values of the sent entries."""
        idx = kernels.unpack_indices(_array(fields["idx"], "<u2"), _array(fields["cnt"], "<u4"), n)
        if not self.int8_values:
            return idx, _array(fields["val"], "<f4")
        values = np.empty(idx.size, np.float32)
        kernels.dequantize_int8(_array(fields["q"], np.int8), _array(fields["scale"], "<f4"), values)
        return idx, values


class BlockTopKCodec(SparseCodec):
    """Block-local top-k with 4- or 2-bit values (``topk:F+int4``, ``topk:F+int2``).

    Each block of 4096 elements (the last may be shorter) sends its own
    k_b = round(F * block length), at least 1, largest-magnitude entries (ties:
    lowest offset first), so every size follows from n and F. One field, so a
    tensor pays one alignment pad (a 32-element bias: 4 + 2 + 1 bytes)::

        data: scale    ceil(n/4096) float32, one per block
              offsets  ceil(1.5k) bytes: each entry's 12-bit offset in its block,
                       increasing within a block, blocks in order; pairs a, b as
                       a & 255, a >> 8 | (b & 15) << 4, b >> 4
              codes    ceil(k*bits/8) bytes: a code c per entry, same order,
                       first in the low bits of each byte

    An entry decodes to (c - h + 0.5) * scale, h = 2**(bits-1): 16 levels for
    int4, sign x {0.5, 1.5} * scale for int2; one float32 product, so every
    machine decodes the same bits. The scale is least-squares fitted (Lloyd
    steps, kernels.quantize_lowbit): 3x less error on the kept values of
    normals than absmax scaling (int2: 0.10 vs 0.32 at F=0.01); levels offset
    from zero ({2, 3} * scale) do better on normals (0.09) but far worse on
    heavy tails (Student t3: 0.44 vs 0.35). Scales are float32: late-training
    deltas of 1e-8 are ordinary and float16 flushes below 6e-8; the 2 bytes
    per block cost 2.6% of the ratio. Ratio 4 * 4096 / (4 + k_b * (1.5 +
    bits/8)): 216 (int2) and 190 (int4) at F=0.01. Error: the left-out norm as
    for topk:F (0.957 at F=0.01), plus the kept values' error (int2 0.10,
    int4 0.045 of their norm at F=0.01); error feedback sends both later.
    """

    def __init__(self, fraction: float, bits: int) -> None:
        self.fraction, self.bits = fraction, bits
        self.name = f"topk:{fraction!r}+int{bits}"

    def field_sizes(self, n: int, itemsize: int) -> dict[str, int]:
        return {"data": sum(self._parts(n))}

    def encode_into(self, x: torch.Tensor, out: Fields) -> None:
        flat = _float32(x)
        nfull, k_full, k_tail = kernels.block_topk_counts(self.fraction, flat.size)
        idx = kernels.select_block_topk(flat, k_full, k_tail)
        scale, offsets, packed = self._split(out["data"], flat.size)
        kernels.pack_offsets12(idx & (kernels.TOPK_BLOCK - 1), offsets)
        codes = np.empty(idx.size, np.uint8)
        kernels.quantize_lowbit(flat[idx], nfull, k_full, self.bits, codes, scale.view("<f4"))
        kernels.pack_bits(codes, self.bits, packed)

    def expected_ratio(self) -> float:
        k_b = kernels.topk_count(self.fraction, kernels.TOPK_BLOCK)
        return 4 * kernels.TOPK_BLOCK / (4 + k_b * (1.5 + self.bits / 8))

    def expected_error(self) -> float:
        f = kernels.topk_count(self.fraction, kernels.TOPK_BLOCK) / kernels.TOPK_BLOCK
        return math.sqrt(max(0.0, 1 - _kept_energy(f)) + _kept_energy(f) * self._quant_error() ** 2) + 0.004

    def _quant_error(self) -> float:
        """Bound on the kept values' relative error: measured on normals 0.10 / 0.045 (int2 / int4)
        at F=0.01, 0.18 / 0.064 at 0.1, 0.345 / 0.107 at 1; c * F**0.2 stays above those."""
        return (0.37 if self.bits == 2 else 0.12) * self.fraction**0.2

    def _parts(self, n: int) -> tuple[int, int, int]:
        """Bytes of the scales, the offsets and the values inside ``data``."""
        nfull, k_full, k_tail = kernels.block_topk_counts(self.fraction, n)
        k = nfull * k_full + k_tail
        return 4 * -(-n // kernels.TOPK_BLOCK), (3 * k + 1) // 2, -(-k * self.bits // 8)

    def _split(self, data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``data`` as its three parts."""
        scale, offsets, _ = self._parts(n)
        return data[:scale], data[scale : scale + offsets], data[scale + offsets :]

    def _sparse(self, fields: Mapping, n: int) -> tuple[np.ndarray, np.ndarray]:
        nfull, k_full, k_tail = kernels.block_topk_counts(self.fraction, n)
        k = nfull * k_full + k_tail
        scale, offsets, packed = self._split(_array(fields["data"], np.uint8), n)
        idx = kernels.block_positions(kernels.unpack_offsets12(offsets, k), nfull, k_full, n)
        values = np.empty(k, np.float32)
        codes = kernels.unpack_bits(packed, self.bits, k)
        kernels.dequantize_lowbit(codes, nfull, k_full, self.bits, _array(scale, "<f4"), values)
        return idx, values


class SizePolicy(Codec):
    """``CODEC@N[:SMALL]``: floating tensors of fewer than N elements go SMALL, the rest CODEC.

    Only ``for_tensor`` is meaningful: the wire asks it per tensor and writes
    the codec it returns in the tensor's header (``name`` is the spec, stored
    in the run's config, never in a header). ``lossy`` when either side is, so
    error feedback and the lossy downlink run for it; a tensor sent lossless
    leaves a zero residual.
    """

    def __init__(self, large: Codec, threshold: int, small: Codec) -> None:
        self.large, self.threshold, self.small = large, threshold, small
        self.lossy = large.lossy or small.lossy
        self.name = f"{large.name}@{threshold}" + ("" if small.name == "none" else f":{small.name}")

    def for_tensor(self, n: int, floating: bool) -> Codec:
        return (self.small if n < self.threshold else self.large).for_tensor(n, floating)

    def field_sizes(self, n: int, itemsize: int) -> dict[str, int]:
        raise TypeError(f"{self.name} is a size policy, not a tensor codec: use for_tensor")

    def expected_ratio(self) -> float:
        return self.large.expected_ratio()

    def expected_error(self) -> float:
        return max(self.large.expected_error(), self.small.expected_error())


CODECS: dict[str, type[Codec]] = {
    "none": NoneCodec,
    "fp16": HalfCodec,
    "bf16": HalfCodec,
    "int8": Int8Codec,
    "topk": TopKCodec,
    "topk+int8": TopKCodec,
    "topk+int4": BlockTopKCodec,
    "topk+int2": BlockTopKCodec,
}
EXAMPLES: tuple[str, ...] = (
    "none",
    "fp16",
    "bf16",
    "int8",
    "topk:0.01",
    "topk:0.01+int8",
    "topk:0.01+int4",
    "topk:0.01+int2",
)


@functools.lru_cache(maxsize=256)
def parse_codec(spec: str) -> Codec:
    """Codec (or SizePolicy) for a spec such as ``int8`` or ``topk:0.01+int2@4096``.

    UnknownCodec, listing the valid forms, for anything else.
    """
    if not isinstance(spec, str):
        raise UnknownCodec(f"codec spec must be a string, not {type(spec).__name__}; valid: {VALID_SPECS}")
    text = spec.strip().lower()
    if "@" in text:
        return _parse_policy(spec, text)
    return _parse_one(spec, text)


def _parse_policy(spec: str, text: str) -> SizePolicy:
    """``CODEC@N[:SMALL]``."""
    large_spec, _, rest = text.partition("@")
    count, colon, small_spec = rest.partition(":")
    if not (count.isascii() and count.isdigit() and 1 <= int(count) <= MAX_THRESHOLD):
        raise UnknownCodec(
            f"bad size threshold {count[:40]!r} in codec spec {spec[:80]!r}: need an integer N, "
            f"1 <= N <= {MAX_THRESHOLD}; valid: {VALID_SPECS}"
        )
    small_spec = small_spec if colon else "none"
    if small_spec not in SMALL_CODECS:
        raise UnknownCodec(
            f"small-tensor codec {small_spec[:40]!r} in codec spec {spec[:80]!r} must be one of "
            f"{', '.join(SMALL_CODECS)}; valid: {VALID_SPECS}"
        )
    return SizePolicy(_parse_one(spec, large_spec), int(count), _parse_one(spec, small_spec))


def _parse_one(spec: str, text: str) -> Codec:
    """One tensor codec from its lower-cased spec ``text`` (``spec`` as given, for messages)."""
    simple = {"none": NoneCodec, "int8": Int8Codec}
    if text in simple:
        return simple[text]()
    if text in ("fp16", "bf16"):
        return HalfCodec(text, torch.float16 if text == "fp16" else torch.bfloat16)
    if text.startswith("topk:"):
        suffix = next((s for s in TOPK_VALUES if text.endswith(s)), "")
        body, bits = text[5 : len(text) - len(suffix)], TOPK_VALUES.get(suffix, 32)
        try:
            fraction = float(body)
        except ValueError:
            fraction = math.nan
        if 0 < fraction <= 1 and body.strip() == body and "_" not in body:
            return TopKCodec(fraction, bits == 8) if bits >= 8 else BlockTopKCodec(fraction, bits)
        raise UnknownCodec(
            f"bad top-k fraction {body!r} in codec spec {spec!r}: need 0 < F <= 1; valid: {VALID_SPECS}"
        )
    raise UnknownCodec(f"unknown codec spec {spec[:80]!r}; valid: {VALID_SPECS}")


NONE = NoneCodec()


def view_tensor(buf: memoryview, dtype: torch.dtype, n: int) -> torch.Tensor:
    """A flat tensor over ``buf`` without copying; a copy where the bytes are misaligned."""
    if n == 0:
        return torch.empty(0, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=dtype, count=n)
    if flat.data_ptr() % dtype.itemsize:
        return torch.frombuffer(bytearray(buf), dtype=dtype, count=n)  # bytearray storage is aligned
    return flat


def _kept_energy(f: float) -> float:
    """Share of a normal's energy in its fraction f of largest magnitudes: E[x^2; |x| > t]."""
    if f >= 1:
        return 1.0
    t = NormalDist().inv_cdf(1 - f / 2)
    return min(1.0, f + 2 * t * NormalDist().pdf(t))


def _array(buf: memoryview | np.ndarray, dtype: str | type) -> np.ndarray:
    """Numpy view of a field (aligned copy where needed)."""
    arr = np.frombuffer(buf, dtype) if not isinstance(buf, np.ndarray) else buf.view(dtype)
    return arr if arr.flags.aligned else arr.copy()


def _out(out: np.ndarray | None, n: int) -> np.ndarray:
    """The caller's float32 output array, or a new one."""
    return np.empty(n, np.float32) if out is None else out


def _float32(x: torch.Tensor) -> np.ndarray:
    """Flat float32 numpy view (or converted copy) of a CPU float tensor."""
    return x.reshape(-1).to(torch.float32).numpy()


def _cast(out: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Decoded float32 values as a tensor of the declared dtype."""
    t = torch.from_numpy(out)
    return t if dtype == torch.float32 else t.to(dtype)


with warnings.catch_warnings():  # torch warns once per process about read-only buffers; views
    warnings.simplefilter("ignore")  # over received bytes are read-only by design (see wire.loads)
    torch.frombuffer(b"\0", dtype=torch.uint8)
