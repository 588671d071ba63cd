"""Reading metadata.json out of a Trivy DB archive as it streams (Standalone mode's DB
watch), on the archive the sandbox really publishes."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from sandbox.advisories import UPDATE_BUILT_AT, build_db, load_advisories, load_update
from scangate.core.dbmetadata import ArchiveError, MetadataReader


def read(data: bytes, chunk: int) -> MetadataReader:
    reader = MetadataReader()
    for i in range(0, len(data), chunk):
        reader.feed(data[i:i + chunk])
    return reader


@pytest.mark.parametrize("chunk", [1, 511, 4096, 1 << 20])
def test_the_metadata_of_the_sandbox_db_is_read_in_any_chunking(tmp_path: Path,
                                                                chunk: int) -> None:
    archive = build_db(tmp_path, [*load_advisories(), *load_update()], UPDATE_BUILT_AT)
    metadata = read(archive.read_bytes(), chunk).metadata
    assert metadata is not None and metadata["UpdatedAt"] == "2026-11-02T00:00:00Z"


def tar_gz(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue())


def test_what_is_not_a_db_archive_is_an_error() -> None:
    with pytest.raises(ArchiveError, match="gzip"):
        read(b"not gzip at all", 5)
    with pytest.raises(ArchiveError, match=r"without metadata\.json"):
        read(tar_gz(("trivy.db", b"x" * 1000)), 100)
    with pytest.raises(ArchiveError, match="not JSON"):
        read(tar_gz(("metadata.json", b"{nope")), 100)
    with pytest.raises(ArchiveError, match="larger"):
        read(tar_gz(("metadata.json", b" " * 70_000)), 4096)
    assert read(tar_gz(("./metadata.json", json.dumps({"UpdatedAt": "x"}).encode())),
                7).metadata == {"UpdatedAt": "x"}
