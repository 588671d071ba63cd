"""ClamAV test signatures and a private mirror serving them, for the sandbox.

The databases are built here with Debian's sigtool: a .hsb of SHA-256 hashes (the EICAR
test file, clamav-testfiles' clam.exe) and a .ndb body signature of the EICAR string,
packed into an unsigned database (.cud: a header with version and build time, which
clamscan loads as it loads ClamAV's own .cvd files). No signature of ClamAV's own is
used: none can be downloaded here, and the tests must know what each one matches.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

EICAR = (rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
"""The EICAR anti-virus test file (68 bytes): harmless, detected by every engine."""
CLAM_EXE = Path("/usr/share/clamav-testfiles/clam.exe")
"""A harmless PE file of Debian's clamav-testfiles that ClamAV's tests detect."""
DB_NAME = "scangate-test.cud"
EICAR_SIGNATURE = "Scangate.Test.EICAR"
CLAM_EXE_SIGNATURE = "Scangate.Test.ClamExe"


def require_clamav() -> None:
    for tool in ("clamscan", "sigtool"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: install Debian's clamav (hack/deps)")
    if not CLAM_EXE.is_file():
        raise RuntimeError(f"{CLAM_EXE} is missing: install Debian's clamav-testfiles "
                           f"(hack/deps)")


def build_database(directory: Path, version: int = 1) -> Path:
    """The test database DB_NAME in `directory` (built with sigtool); its path."""
    require_clamav()
    work = directory / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "eicar.com").write_bytes(EICAR)
    shutil.copy(CLAM_EXE, work / "clam.exe")
    hashes = []
    for name, signature in (("eicar.com", EICAR_SIGNATURE), ("clam.exe", CLAM_EXE_SIGNATURE)):
        line = subprocess.run(["sigtool", "--sha256", name], cwd=work, capture_output=True,
                              text=True, check=True).stdout.strip()
        digest, size, _ = line.split(":", 2)
        hashes.append(f"{digest}:{size}:{signature}.Hash")
    stem = DB_NAME.removesuffix(".cud")
    (work / f"{stem}.hsb").write_text("\n".join(hashes) + "\n")
    # A body signature: the EICAR string anywhere in any file, however it is wrapped.
    (work / f"{stem}.ndb").write_text(
        f"{EICAR_SIGNATURE}.String:0:*:{b'EICAR-STANDARD-ANTIVIRUS-TEST-FILE'.hex()}\n")
    (work / "eicar.com").unlink()
    (work / "clam.exe").unlink()
    (work / "COPYING").write_text("scangate test signatures\n")  # sigtool --build wants it
    subprocess.run(["sigtool", "--unsigned", f"--build={DB_NAME}", f"--cvd-version={version}",
                    "--no-cdiff"], cwd=work, input="scangate-tests\n",
                   capture_output=True, text=True, check=True)
    target = directory / DB_NAME
    shutil.move(work / DB_NAME, target)
    shutil.rmtree(work, ignore_errors=True)
    return target


@contextmanager
def mirror(directory: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """A private mirror: `directory` over plain HTTP on `host` (loopback; the real node's
    bridge address for its pods), its URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
