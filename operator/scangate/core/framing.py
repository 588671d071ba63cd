"""How a scan result crosses the pod log: compressed, base64, framed with a checksum.

Pod logs get truncated, interleaved and corrupted under load (trivy-operator's
"illegal base64" and "bzip2 bad magic" reports). A result is only accepted when
its frame is complete and its SHA-256 matches; anything else is a failed attempt
to retry, never a wrong answer. A log is also refused, rather than exhausting
memory, when it is too long or its frames decompress past a limit (a gzip bomb:
a few hundred kilobytes of log can inflate to gigabytes). The shell side (the scan Job) writes:

    SCANGATE-FRAME-BEGIN name=<name> size=<bytes of the gzip> sha256=<hex of the gzip>
    <base64 of the gzip, in lines>
    SCANGATE-FRAME-END name=<name>
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import re
import zlib

BEGIN = "SCANGATE-FRAME-BEGIN"
END = "SCANGATE-FRAME-END"
_BEGIN_LINE = re.compile(
    rf"^{BEGIN} name=([A-Za-z0-9_.-]+) size=([0-9]+) sha256=([0-9a-f]{{64}})\s*$"
)


MAX_FRAME_BYTES = 8 * 1024 * 1024
"""The most that the frames of one log may decompress to, together (the operator's
MAX_RESULT_BYTES sets it)."""
MAX_LOG_CHARS = 256 * 1024 * 1024
"""The longest log decoded at all."""
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate stream


class FrameError(ValueError):
    """The log does not hold an intact frame."""


class FrameTooLarge(FrameError):
    """Intact frames that decompress past the limit: the same log would be refused again,
    so this is no damage to retry but a result too large to take."""


def encode(name: str, payload: bytes) -> str:
    """A frame as the scan Job prints it (used by tests and `scangate` itself)."""
    packed = gzip.compress(payload, mtime=0)
    body = base64.encodebytes(packed).decode()
    return (f"{BEGIN} name={name} size={len(packed)} sha256={hashlib.sha256(packed).hexdigest()}\n"
            f"{body}{END} name={name}\n")


def decode(log: str, *, max_bytes: int = MAX_FRAME_BYTES,
           max_log_chars: int = MAX_LOG_CHARS) -> dict[str, bytes]:
    """Every frame in a log, by name; raises FrameError on any damage, or when the log
    is longer than `max_log_chars` or its frames decompress to more than `max_bytes`
    together (a limit per frame would let many small bombs through)."""
    if len(log) > max_log_chars:
        raise FrameError(f"log of {len(log)} characters is longer than {max_log_chars}")
    frames: dict[str, bytes] = {}
    used = 0
    lines = log.splitlines()
    i = 0
    while i < len(lines):
        m = _BEGIN_LINE.match(lines[i])
        if not m:
            if lines[i].startswith(BEGIN):
                raise FrameError(f"malformed frame header: {lines[i][:120]!r}")
            i += 1
            continue
        name, size, digest = m.group(1), int(m.group(2)), m.group(3)
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith(END):
            body.append(lines[i].strip())
            i += 1
        if i == len(lines) or lines[i].strip() != f"{END} name={name}":
            raise FrameError(f"frame {name!r} is truncated: no end marker")
        try:
            packed = base64.b64decode("".join(body), validate=True)
        except (binascii.Error, ValueError) as e:
            raise FrameError(f"frame {name!r} is corrupted: {e}") from None
        if len(packed) != size:
            raise FrameError(f"frame {name!r} is truncated: {len(packed)} of {size} bytes")
        if hashlib.sha256(packed).hexdigest() != digest:
            raise FrameError(f"frame {name!r} is corrupted: checksum mismatch")
        left = max_bytes - used
        try:
            inflated = _gunzip(packed, left)
        except zlib.error as e:
            raise FrameError(f"frame {name!r} does not decompress: {e}") from None
        if len(inflated) > left:
            others = " with the frames before it" if used else ""
            raise FrameTooLarge(f"frame {name!r} decompresses to more than {max_bytes} "
                                f"bytes{others}")
        frames[name] = bytes(inflated)
        del inflated
        used += len(frames[name])
        i += 1
    return frames


_CHUNK = 1 << 20


def _gunzip(packed: bytes, limit: int) -> bytearray:
    """`packed` decompressed, but cut short after `limit` + 1 bytes so that a bomb
    never inflates further; raises zlib.error on damage. Inflated a MiB at a time into
    one buffer: what it holds is about what it returns, never a copy of it besides."""
    out = bytearray()
    rest = packed
    while rest and len(out) <= limit:  # members may be concatenated, as gzip(1) allows
        member = zlib.decompressobj(wbits=_GZIP_WBITS)
        data = rest
        while not member.eof and len(out) <= limit:
            chunk = member.decompress(data, min(_CHUNK, limit + 1 - len(out)))
            out += chunk
            data = member.unconsumed_tail
            if not data and not chunk and not member.eof:
                raise zlib.error("truncated gzip stream")
        rest = member.unused_data.lstrip(b"\0")  # gzip(1) tolerates zero padding
    return out
