"""The envelope every message travels in, and the frame of a large one (services/protocol.py has the messages).

`encode` / `decode`: a msgpack map `{"v": SCHEMA_VERSION, "t": <type tag>, "d": <payload>}`. `frame` /
`unframe`: the same map with the payload's arrays in one binary field at its end, read back as views (no
copy). Anything malformed raises `ProtocolError`; nothing here unpickles or evaluates received data.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

# 2: a TrajectoryGroup's samples travel as columns. 3: a TrajectoryGroup is framed (`frame`), its texts optional.
SCHEMA_VERSION = 3
MAX_MESSAGE_BYTES = 64 * 2**20


class ProtocolError(ValueError):
    """A received message is malformed, of the wrong type, or of an unknown schema version."""


def pack_i32(values: Any) -> memoryview:
    # A view, not `tobytes()`: msgpack copies a buffer straight into the message, so this saves a copy.
    return memoryview(np.ascontiguousarray(values, dtype="<i4")).cast("B")


def pack_f32(values: Any) -> memoryview:
    return memoryview(np.ascontiguousarray(values, dtype="<f4")).cast("B")


def _unpack(raw: Any, dtype: str, what: str) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 4:
        raise ProtocolError(f"{what}: expected packed {dtype} bytes")
    return np.frombuffer(raw, dtype=dtype).copy()


# -- the frame of a large message -------------------------------------------------------------------------------
# fixmap(6): "v" 3, "h" <uint32: offset of the "_" key>, "t" <tag>, "d" <payload>, "_" <bin8 padding>, "b" <bin32>
_FRAME_HEAD = b"\x86\xa1v" + bytes([SCHEMA_VERSION]) + b"\xa1h\xce"
_FRAME_ALIGN = 8  # the blob starts at a multiple of this in the message, so every array is aligned


def frame(tag: str, payload: dict[str, Any], arrays: list[Any], external: bool = False) -> bytes:
    """A framed message: `payload` (its `"arrays"` set here to the byte size of each of `arrays`, in order) and
    the arrays' bytes one after another in `"b"`. `arrays` are C-contiguous buffers (numpy arrays, bytes); each
    is copied once, into the message. `external`: only their sizes go in; the arrays travel beside it."""
    sizes = [a.nbytes if isinstance(a, np.ndarray) else memoryview(a).nbytes for a in arrays]
    body = msgpack.packb("t") + msgpack.packb(tag) + msgpack.packb("d") + msgpack.packb(
        {**payload, "arrays": sizes}, use_bin_type=True)
    h = len(_FRAME_HEAD) + 4 + len(body)
    pad = -(h + 11) % _FRAME_ALIGN  # "_" key (2) + bin8 header (2) + pad, then "b" key (2) + bin32 header (5)
    blob_len = 0 if external else sum(sizes)
    if blob_len >= 2**32:
        raise ValueError(f"{tag}: {blob_len} bytes of arrays do not fit a frame")
    tail = b"\xa1_\xc4" + bytes([pad]) + bytes(pad) + b"\xa1b\xc6" + blob_len.to_bytes(4, "big")
    return b"".join([_FRAME_HEAD, h.to_bytes(4, "big"), body, tail, *([] if external else arrays)])


def is_framed(raw: Any) -> bool:
    return isinstance(raw, (bytes, bytearray, memoryview)) and bytes(raw[:len(_FRAME_HEAD)]) == _FRAME_HEAD


def unframe(raw: Any, tag: str, max_bytes: int | None = None,
            external: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """The payload of a framed message and its blob, a read-only `uint8` view over `raw` (no copy); the
    payload's `"arrays"` (checked) are the byte sizes of the arrays that lie back to back in the blob.
    `external`: the arrays travel beside the frame (stream fields of their own) and its blob is empty."""
    max_bytes = MAX_MESSAGE_BYTES if max_bytes is None else max_bytes
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {max_bytes}")
    if not is_framed(raw):
        decode(raw, tag, max_bytes)  # raises the envelope's own error (version, type, garbage) where it has one
        raise ProtocolError(f"{tag}: not framed (schema {SCHEMA_VERSION} frames this message type)")
    buf = np.frombuffer(raw, dtype=np.uint8)
    h0 = len(_FRAME_HEAD) + 4
    if len(raw) < h0 + 11:
        raise ProtocolError("frame: truncated header")
    h = int.from_bytes(bytes(raw[len(_FRAME_HEAD):h0]), "big")
    if not h0 < h <= len(raw) - 11:
        raise ProtocolError(f"frame: header length {h} outside the message")
    try:
        # The header's four objects ("t", tag, "d", payload) behind a fixmap(2) byte are one map: one call.
        head = msgpack.unpackb(b"\x82" + bytes(raw[h0:h]), raw=False, strict_map_key=True, max_bin_len=h - h0,
                               max_str_len=h - h0)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated exception types on garbage
        raise ProtocolError(f"frame: undecodable header: {type(exc).__name__}: {exc}") from None
    if not isinstance(head, dict) or list(head) != ["t", "d"]:
        raise ProtocolError("frame: header keys are not t, d")
    if head["t"] != tag:
        raise ProtocolError(f"expected message type {tag!r}, got {head['t']!r}")
    payload = head["d"]
    if not isinstance(payload, dict):
        raise ProtocolError("payload is not a map")
    if bytes(raw[h:h + 3]) != b"\xa1_\xc4":
        raise ProtocolError("frame: no padding field after the header")
    b = h + 4 + raw[h + 3]
    if len(raw) < b + 7 or bytes(raw[b:b + 3]) != b"\xa1b\xc6":
        raise ProtocolError("frame: no blob field after the padding")
    start = b + 7
    blob_len = int.from_bytes(bytes(raw[b + 3:start]), "big")
    if start + blob_len != len(raw):
        raise ProtocolError(f"frame: blob of {blob_len} bytes, {len(raw) - start} arrived")
    sizes = payload.get("arrays")
    if not isinstance(sizes, list) or not all(type(n) is int and n >= 0 for n in sizes):
        raise ProtocolError(f"frame: array sizes {str(sizes)[:80]} are not a list of byte counts")
    if (blob_len != 0) if external else (sum(sizes) != blob_len):
        where = "beside the frame, its blob empty" if external else f"in the blob's {blob_len} bytes"
        raise ProtocolError(f"frame: array sizes {str(sizes)[:80]} do not match: expected {where}")
    blob = buf[start:]
    blob.flags.writeable = False
    return payload, blob


def frame_arrays(raw: Any, tag: str) -> tuple[dict[str, Any], list[bytes]]:
    """A framed message's payload and a copy of each of its arrays' bytes (for tools and tests)."""
    payload, blob = unframe(raw, tag)
    bounds = np.cumsum([0, *payload["arrays"]]).tolist()
    return payload, [blob[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:])]


def _view(raw: np.ndarray, dtype: str, what: str) -> np.ndarray:
    if raw.nbytes % 4:
        raise ProtocolError(f"{what}: expected packed {dtype} bytes")
    return raw.view(dtype)


def get_field(d: dict[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    if key not in d:
        raise ProtocolError(f"{what}: missing field {key!r}")
    value = d[key]
    # bool is an int subclass; a bool where a number is expected is a malformed message.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ProtocolError(f"{what}.{key}: expected {types}, got bool")
    if not isinstance(value, types):
        raise ProtocolError(f"{what}.{key}: expected {types}, got {type(value).__name__}")
    return value


def encode(tag: str, payload: dict[str, Any]) -> bytes:
    """The envelope of every message: `{"v": SCHEMA_VERSION, "t": tag, "d": payload}`, msgpack."""
    return msgpack.packb({"v": SCHEMA_VERSION, "t": tag, "d": payload}, use_bin_type=True)


def decode(raw: bytes, tag: str, max_bytes: int | None = None) -> dict[str, Any]:
    max_bytes = MAX_MESSAGE_BYTES if max_bytes is None else max_bytes
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {max_bytes}")
    try:
        env = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True, max_bin_len=max_bytes)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated exception types on garbage
        raise ProtocolError(f"undecodable msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(env, dict):
        raise ProtocolError("envelope is not a map")
    version = env.get("v")
    # `True == 1` and `1.0 == 1` in Python, so compare the type too: only the int 1 is schema version 1.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ProtocolError(f"unknown schema version {version!r} (this build speaks {SCHEMA_VERSION})")
    if env.get("t") != tag:
        raise ProtocolError(f"expected message type {tag!r}, got {env.get('t')!r}")
    payload = env.get("d")
    if not isinstance(payload, dict):
        raise ProtocolError("payload is not a map")
    return payload
