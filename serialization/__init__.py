"""crowdtrain's wire format (msgpack + raw tensor bytes) and delta codecs."""

from .codecs import CODECS, Codec, parse_codec
from .errors import UnknownCodec, WireFormatError
from .partial import loads_some
from .types import TensorDict
from .updates import apply_update
from .wire import (
    DEFAULT_LIMIT,
    FORMAT_VERSION,
    MAX_META_BYTES,
    Encoded,
    Expected,
    dumps,
    dumps_stream,
    dumps_visit,
    encoded_size_bound,
    loads,
)

__all__ = [
    "CODECS",
    "DEFAULT_LIMIT",
    "FORMAT_VERSION",
    "MAX_META_BYTES",
    "Codec",
    "Encoded",
    "Expected",
    "TensorDict",
    "UnknownCodec",
    "WireFormatError",
    "apply_update",
    "dumps",
    "dumps_stream",
    "dumps_visit",
    "encoded_size_bound",
    "loads",
    "loads_some",
    "parse_codec",
]
