"""The tensors behind the KV blocks, and the self-describing byte payload they export to and import from.

Layout: one K and one V tensor of shape [layers, blocks * block_size, kv_heads, head_dim]; a token's
"slot" is block_id * block_size + offset, so a paged gather is one index_select per layer.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import asdict, dataclass

import orjson
import torch
import xxhash

from microserve.engine import host_memory

MAGIC = b"MSKV"
VERSION = 1
_HEADER_LEN = struct.Struct("<I")
_CHECKSUM = struct.Struct("<Q")
# Payload: MAGIC | header length | JSON header (space-padded) | checksum of the body | body (8-aligned).
# The body is K then V, each [layers, tokens, kv_heads, head_dim] in the layout's dtype.


class KVPayloadError(ValueError):
    """A KV payload that cannot be imported here: wrong format, incompatible layout or corrupt bytes."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # torch dtype name without the "torch." prefix

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{self.dtype!r} is not a torch dtype")
        return dtype

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


class KVStorage:
    """K and V tensors for every block of the pool."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        shape = (layout.num_layers, num_blocks * layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.k = host_memory.zeros(shape, layout.torch_dtype, self.device)
        self.v = host_memory.zeros(shape, layout.torch_dtype, self.device)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.layout.block_size
        self.k[:, dst * bs : (dst + 1) * bs] = self.k[:, src * bs : (src + 1) * bs]
        self.v[:, dst * bs : (dst + 1) * bs] = self.v[:, src * bs : (src + 1) * bs]

    def export(self, slots: torch.Tensor, begin: int, end: int, token_ids: list[int]) -> memoryview:
        """Serialize the KV of the tokens at `slots` (positions begin..end of `token_ids`).

        K and V are gathered straight into the payload's (aligned) body: one copy out of the cache.
        """
        n = slots.numel()
        layout = self.layout
        header = orjson.dumps(
            {
                "version": VERSION,
                **asdict(layout),
                "begin": begin,
                "end": end,
                "tokens_hash": tokens_hash(token_ids),
            }
        )
        header += b" " * (-(len(MAGIC) + _HEADER_LEN.size + len(header)) % 8)  # align what follows
        body_at = len(MAGIC) + _HEADER_LEN.size + len(header) + _CHECKSUM.size
        buf = torch.empty(body_at + n * layout.bytes_per_token, dtype=torch.uint8)
        shape = (2, layout.num_layers, n, layout.num_kv_heads, layout.head_dim)
        body = buf[body_at:].view(layout.torch_dtype).view(shape)
        if self.device.type == "cpu":
            torch.index_select(self.k, 1, slots, out=body[0])
            torch.index_select(self.v, 1, slots, out=body[1])
        else:
            slots = slots.to(self.device)
            body[0].copy_(self.k.index_select(1, slots))
            body[1].copy_(self.v.index_select(1, slots))
        view = buf.numpy().data  # the tensor's own bytes (numpy's stubs give 3.11 no buffer protocol)
        checksum = xxhash.xxh3_64_intdigest(view[body_at:])
        view[:body_at] = MAGIC + _HEADER_LEN.pack(len(header)) + header + _CHECKSUM.pack(checksum)
        return view

    def import_(self, slots: torch.Tensor, payload: KVPayload) -> None:
        """Write a parsed, validated payload into `slots` (one per token of the payload)."""
        n = payload.end - payload.begin
        if slots.numel() != n:
            raise KVPayloadError(f"payload holds {n} tokens but {slots.numel()} slots were given")
        shape = (2, self.layout.num_layers, n, self.layout.num_kv_heads, self.layout.head_dim)
        with warnings.catch_warnings():
            # The buffer may be read-only (bytes); it is only ever read here.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(payload.data, dtype=torch.uint8)
        kv = raw.view(self.layout.torch_dtype).reshape(shape).to(self.device)
        slots = slots.to(self.device)
        self.k.index_copy_(1, slots, kv[0])
        self.v.index_copy_(1, slots, kv[1])


@dataclass(frozen=True, slots=True)
class KVPayload:
    layout: KVLayout
    begin: int
    end: int
    tokens_hash: int
    data: memoryview


def parse_payload(raw: bytes | bytearray | memoryview, expected: KVLayout) -> KVPayload:
    """Check format, layout compatibility and checksum; raises KVPayloadError saying which failed."""
    raw = memoryview(raw).cast("B")
    fixed = len(MAGIC) + _HEADER_LEN.size
    if len(raw) < fixed or raw[: len(MAGIC)] != MAGIC:
        raise KVPayloadError("not a microserve KV payload (bad magic)")
    (header_len,) = _HEADER_LEN.unpack_from(raw, len(MAGIC))
    body_at = fixed + header_len + _CHECKSUM.size
    if len(raw) < body_at:
        raise KVPayloadError("KV payload is truncated inside its header")
    try:
        header = orjson.loads(raw[fixed : fixed + header_len])
        layout = KVLayout(**{k: header[k] for k in KVLayout.__dataclass_fields__})
        version, begin, end, tok_hash = (
            header["version"],
            header["begin"],
            header["end"],
            header["tokens_hash"],
        )
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise KVPayloadError(f"KV payload header is malformed: {exc}") from None
    if version != VERSION:
        raise KVPayloadError(f"KV payload version {version} is not supported (expected {VERSION})")
    if layout != expected:
        raise KVPayloadError(f"incompatible KV layout: payload has {layout}, this engine has {expected}")
    data = raw[body_at:]
    if end < begin or len(data) != (end - begin) * layout.bytes_per_token:
        raise KVPayloadError(
            f"KV payload is truncated or oversized: {len(data)} bytes for tokens [{begin}, {end})"
        )
    (checksum,) = _CHECKSUM.unpack_from(raw, fixed + header_len)
    if xxhash.xxh3_64_intdigest(data) != checksum:
        raise KVPayloadError("KV payload checksum mismatch: the bytes were corrupted in transit")
    return KVPayload(layout, begin, end, tok_hash, data)


def tokens_hash(token_ids: list[int]) -> int:
    return xxhash.xxh3_64_intdigest(orjson.dumps(token_ids))
