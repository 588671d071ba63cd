"""The metadata.json of a Trivy DB archive (db.tar.gz, the layer of the DB's OCI
artifact), read as the archive streams: what the DB repository's newest DB is, in
Standalone mode (scangate.scanning.dbwatch). Pure: bytes in, a dict out.

The archive is trivy.db then metadata.json (as Trivy's publisher and the sandbox pack
it): the reader decompresses and skips through the first to reach the second, holding
one tar header and the metadata at most, and gives up past MAX_UNPACKED bytes (a
decompression bomb) or on anything that is not a tar stream.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

BLOCK = 512
METADATA = "metadata.json"
MAX_METADATA_BYTES = 64 * 1024
MAX_UNPACKED = 8 * 1024 ** 3
"""Decompressed bytes read at the most (upstream's trivy.db is about 1 GiB unpacked)."""


class ArchiveError(ValueError):
    """Not a DB archive scangate can read the metadata of."""


class MetadataReader:
    """Feed the archive's bytes as they come; `metadata` is set once metadata.json is
    read (the rest of the stream is not needed)."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""
        self._skip = 0
        """Bytes of the current member (and its padding) still to pass over."""
        self._member: str | None = None
        self._size = 0
        self._unpacked = 0
        self.metadata: dict[str, Any] | None = None

    def feed(self, data: bytes) -> None:
        if self.metadata is not None:
            return
        try:
            chunk = self._inflate.decompress(data, 1 << 20)
            while True:
                self._unpacked += len(chunk)
                if self._unpacked > MAX_UNPACKED:
                    raise ArchiveError(f"the archive unpacks past {MAX_UNPACKED} bytes")
                self._take(chunk)
                if self.metadata is not None or not self._inflate.unconsumed_tail:
                    return
                chunk = self._inflate.decompress(self._inflate.unconsumed_tail, 1 << 20)
        except zlib.error as e:
            raise ArchiveError(f"the archive is not gzip: {e}") from None

    def _take(self, chunk: bytes) -> None:
        if self._skip >= len(chunk):
            self._skip -= len(chunk)
            return
        self._pending += chunk[self._skip:]
        self._skip = 0
        while self.metadata is None:
            if self._member == METADATA:
                padded = -(-self._size // BLOCK) * BLOCK
                if len(self._pending) < self._size:
                    return
                self._read_metadata(self._pending[:self._size])
                self._pending = self._pending[padded:]
                return
            if len(self._pending) < BLOCK:
                return
            header, self._pending = self._pending[:BLOCK], self._pending[BLOCK:]
            if header == bytes(BLOCK):
                raise ArchiveError(f"the archive ends without {METADATA}")
            name, size = _header(header)
            self._member, self._size = name, size
            if name != METADATA:
                padded = -(-size // BLOCK) * BLOCK
                if len(self._pending) >= padded:
                    self._pending = self._pending[padded:]
                else:
                    self._skip, self._pending = padded - len(self._pending), b""
                    return
            elif size > MAX_METADATA_BYTES:
                raise ArchiveError(f"{METADATA} is larger than {MAX_METADATA_BYTES} bytes")

    def _read_metadata(self, data: bytes) -> None:
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            raise ArchiveError(f"{METADATA} is not JSON") from None
        if not isinstance(value, dict):
            raise ArchiveError(f"{METADATA} is not an object")
        self.metadata = value


def _header(block: bytes) -> tuple[str, int]:
    """A ustar header's name and size."""
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    if block[257:262] == b"ustar" and prefix:
        name = f"{prefix}/{name}"
    raw = block[124:136].split(b"\0", 1)[0].strip()
    try:
        size = int(raw or b"0", 8)
    except ValueError:
        raise ArchiveError("the archive is not a tar stream") from None
    return name.removeprefix("./"), size
