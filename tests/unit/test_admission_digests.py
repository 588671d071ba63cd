"""The gate's digest lookups: bounded per review, per namespace and in all; a failure
remembered for ADMISSION_FAILED_LOOKUP_TTL; a review that stops waiting at its deadline.

The registry lookup itself is the one seam (DigestLookups takes it as `resolve`); the
slots, cache and deadline are the real code."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from scangate.admission.digests import PER_NAMESPACE, PER_REVIEW, TOTAL, DigestLookups
from scangate.config import Settings
from scangate.core.destinations import Destinations
from scangate.core.images import ImageRef, parse_image
from scangate.registry.client import RegistryAuthError

DIGEST = "sha256:" + "d" * 64


class Registry:
    """Lookups that wait until released, counting how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.calls: Counter[str] = Counter()
        self.release = asyncio.Event()
        self.fail: set[str] = set()

    async def resolve(self, ref: ImageRef) -> str:
        self.calls[str(ref)] += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        if ref.repository in self.fail:
            raise RegistryAuthError(f"registry {ref.registry} sent a challenge scangate "
                                    "cannot use")
        return DIGEST


def lookups(registry: Registry, **settings: object) -> DigestLookups:
    return DigestLookups(Settings(**settings), Destinations(),  # type: ignore[arg-type]
                         resolve=registry.resolve)


def images(prefix: str, count: int) -> list[ImageRef]:
    return [parse_image(f"r{i}.example/{prefix}/app:{i}") for i in range(count)]


def test_one_review_runs_at_most_four_lookups_at_once() -> None:
    async def go() -> tuple[int, list[tuple[str | None, str]]]:
        registry = Registry()
        gate = lookups(registry)
        review = asyncio.create_task(gate.digests(images("a", 20), "ns", time.monotonic() + 5))
        await asyncio.sleep(0.1)
        held = registry.running
        registry.release.set()
        return held, await review
    held, answers = asyncio.run(go())
    assert held == PER_REVIEW == 4
    assert answers == [(DIGEST, "")] * 20


def test_one_namespace_holds_at_most_eight_and_the_replica_thirty_two() -> None:
    async def go() -> tuple[int, int, int]:
        registry = Registry()
        gate = lookups(registry)
        far = time.monotonic() + 5
        one_namespace = [asyncio.create_task(gate.digests(images(f"n{i}", 4), "busy", far))
                         for i in range(5)]
        await asyncio.sleep(0.1)
        in_one = registry.running
        others = [asyncio.create_task(gate.digests(images(f"o{i}", 4), f"ns{i}", far))
                  for i in range(20)]
        await asyncio.sleep(0.1)
        in_all = registry.running
        registry.release.set()
        await asyncio.gather(*one_namespace, *others)
        return in_one, in_all, registry.most
    in_one, in_all, most = asyncio.run(go())
    assert in_one == PER_NAMESPACE == 8
    assert in_all == most == TOTAL == 32


def test_a_failed_lookup_is_remembered_for_its_ttl_and_costs_one_lookup() -> None:
    async def go() -> tuple[list[tuple[str | None, str]], Counter[str], Counter[str]]:
        registry = Registry()
        registry.fail = {"hostile/app"}
        registry.release.set()
        gate = lookups(registry, admission_failed_lookup_ttl="1s")
        hostile = parse_image("evil.example/hostile/app:1")
        answers = []
        for _ in range(50):  # fifty reviews naming it, some at once
            answers += (await asyncio.gather(*(
                gate.digests([hostile], "ns", time.monotonic() + 2) for _ in range(3))))[0]
        within = Counter(registry.calls)
        await asyncio.sleep(1.1)
        await gate.digests([hostile], "ns", time.monotonic() + 2)
        return answers, within, registry.calls
    answers, within, after = asyncio.run(go())
    assert within == {"evil.example/hostile/app:1": 1}
    assert after == {"evil.example/hostile/app:1": 2}
    assert all(a[0] is None and "challenge scangate cannot use" in a[1] for a in answers)


def test_the_default_failed_lookup_ttl_is_thirty_seconds() -> None:
    assert lookups(Registry()).failed_ttl == 30.0


def test_a_review_stops_waiting_at_its_deadline_and_the_lookup_serves_the_next() -> None:
    async def go() -> tuple[float, list[tuple[str | None, str]], list[tuple[str | None, str]]]:
        registry = Registry()
        gate = lookups(registry, admission_timeout_seconds=2)
        refs = [parse_image("slow.example/a/app:1"), parse_image(f"x.example/a/app@{DIGEST}")]
        start = time.monotonic()
        deadline = gate.review_deadline()
        first = await gate.digests(refs, "ns", deadline)
        waited = time.monotonic() - start
        registry.release.set()  # the lookup ends in the background...
        await asyncio.sleep(0.05)
        second = await gate.digests(refs, "ns", time.monotonic() + 0.01)
        return waited, first, second
    waited, first, second = asyncio.run(go())
    assert 0.4 < waited < 0.8  # 2 s less the 1.5 s kept for the answer
    assert first[0][0] is None and "in time for this review" in first[0][1]
    assert first[1] == (DIGEST, "")  # named by digest: nothing to look up
    assert second == [(DIGEST, ""), (DIGEST, "")]  # ...and its answer is cached


def test_a_lookup_is_cut_off_at_its_own_timeout_and_remembered() -> None:
    async def go() -> tuple[tuple[str | None, str], Counter[str], tuple[int, dict[str, int]]]:
        registry = Registry()  # never released
        gate = lookups(registry, admission_timeout_seconds=1)
        ref = parse_image("hang.example/a/app:1")
        await gate.digests([ref], "ns", time.monotonic() + 0.1)
        await asyncio.sleep(1.2)  # the lookup's own timeout (1 s) passes
        answer = (await gate.digests([ref], "ns", time.monotonic() + 0.1))[0]
        return answer, registry.calls, (gate._in_flight, gate._per_namespace)
    answer, calls, free_slots = asyncio.run(go())
    assert answer[0] is None and "no answer within 1s" in answer[1]
    assert calls == {"hang.example/a/app:1": 1}
    assert free_slots == (0, {})
