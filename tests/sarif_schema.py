"""The official SARIF 2.1.0 JSON schema (OASIS, errata01), to validate `--format sarif` by.

It is not kept in this repository. The Go module github.com/owenrumney/go-sarif/v3 (the
Go SARIF library; Trivy writes its SARIF with its v2) carries the OASIS file verbatim, as
a Go raw string. `go mod download` fetches the pinned version through the Go module proxy
and checks it against Go's checksum database; the schema text is checked against its
pinned SHA-256 and cached under $SCANGATE_CACHE (default ~/.cache/scangate).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from jsonschema.validators import validator_for

MODULE = "github.com/owenrumney/go-sarif/v3@v3.3.1"
SOURCE = "pkg/report/v210/sarif/schema.go"
SHA256 = "c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e"
SCHEMA_ID = ("https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/"
             "sarif-schema-2.1.0.json")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def schema_text() -> str:
    cache = Path(os.environ.get("SCANGATE_CACHE") or Path.home() / ".cache" / "scangate")
    path = cache / "sarif" / f"sarif-schema-2.1.0-{SHA256[:12]}.json"
    if path.is_file() and _digest(text := path.read_text()) == SHA256:
        return text
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(f"Go is needed once to fetch the SARIF schema ({MODULE})")
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([go, "mod", "download", "-json", MODULE], capture_output=True,
                          text=True, timeout=300, cwd=path.parent, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"go mod download {MODULE} failed: {done.stdout} {done.stderr}")
    source = (Path(json.loads(done.stdout)["Dir"]) / SOURCE).read_text()
    text = source[source.index("`") + 1:source.rindex("`")]
    if _digest(text) != SHA256:
        raise RuntimeError(f"{SOURCE} of {MODULE} is not the SARIF schema pinned here")
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)
    return text


def validator() -> Any:
    """A validator of the schema's own draft (4), checked as a schema first."""
    schema = json.loads(schema_text())
    assert schema["id"] == SCHEMA_ID
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)
