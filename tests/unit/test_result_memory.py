"""A decompression bomb in a scan log: 282 KiB-ish of log inflating to 60 MiB of Trivy
JSON is refused as too large (FrameTooLarge, which the reconciler records as
ResultTooLarge without retrying) while the memory it costs stays near MAX_RESULT_BYTES,
not the 1 GiB that inflating and parsing it whole took."""

from __future__ import annotations

import gc
import json
import tracemalloc

import pytest

from scangate.config import Settings
from scangate.core import framing
from scangate.core.framing import FrameError, FrameTooLarge
from scangate.core.results import result_from_log

MiB = 1 << 20


def bomb(inflated: int) -> str:
    """A scan log whose report frame is a valid Trivy report of about `inflated` bytes."""
    vuln = json.dumps({"VulnerabilityID": "CVE-2024-0001", "PkgName": "openssl",
                       "InstalledVersion": "1.0", "FixedVersion": "1.1",
                       "Severity": "CRITICAL", "Title": "x" * 200})
    count = inflated // (len(vuln) + 1)
    report = ('{"SchemaVersion": 2, "Results": [{"Target": "t", "Vulnerabilities": ['
              + ",".join([vuln] * count) + "]}]}").encode()
    return framing.encode("report", report)


def peak_of(log: str, max_bytes: int) -> tuple[int, BaseException | None]:
    gc.collect()
    tracemalloc.start()
    error: BaseException | None = None
    try:
        result_from_log(log, 65536, max_bytes)
    except FrameError as e:
        error = e
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, error


@pytest.fixture(scope="module")
def sixty_mib() -> str:
    return bomb(60 * MiB)


def test_a_60_mib_bomb_is_refused_with_memory_near_the_cap(sixty_mib: str) -> None:
    assert len(sixty_mib) < 2 * MiB  # a small log...
    cap = Settings().max_result_bytes
    assert cap == 8 * MiB
    peak, error = peak_of(sixty_mib, cap)
    assert isinstance(error, FrameTooLarge)
    assert f"decompresses to more than {cap} bytes" in str(error)
    # ...costs what the log and the capped output take (and a few copies of them),
    # never the 60 MiB it inflates to nor the objects parsing those would make.
    assert peak < cap + 4 * len(sixty_mib) + 4 * MiB, peak


def test_the_old_cap_let_it_peak_far_higher(sixty_mib: str) -> None:
    """What the test above guards against: with the former 64 MiB cap the whole report
    was inflated and parsed."""
    peak, error = peak_of(sixty_mib, 64 * MiB)
    assert error is None
    assert peak > 100 * MiB


def test_a_result_under_the_cap_is_taken() -> None:
    _, error = peak_of(bomb(1 * MiB), 8 * MiB)
    assert error is None
