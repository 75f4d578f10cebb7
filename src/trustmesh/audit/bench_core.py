"""Micro-benchmark of the audit log core: in-memory appends, and proof generation
and verification at a given log size (default one million entries).

Run ``python -m trustmesh.audit.bench_core [entries]``. The goal it checks is a
proof built and verified in well under a millisecond at 1M entries. Nothing
here touches a disk, a database or the network.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.proof import verify_consistency, verify_inclusion


@dataclass(frozen=True)
class Percentiles:
    """Latency of one operation in microseconds."""

    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, samples_ns: list[int]) -> Percentiles:
        ordered = sorted(samples_ns)
        n = len(ordered)
        return cls(
            p50=ordered[n // 2] / 1000,
            p99=ordered[min(n - 1, (n * 99) // 100)] / 1000,
            mean=sum(ordered) / n / 1000,
        )

    def __str__(self) -> str:
        return f"p50 {self.p50:7.1f} µs  p99 {self.p99:7.1f} µs  mean {self.mean:7.1f} µs"


@dataclass(frozen=True)
class CoreBench:
    """What :func:`run` measured."""

    entries: int
    append_seconds: float
    inclusion_generate: Percentiles
    inclusion_verify: Percentiles
    inclusion_total: Percentiles
    consistency_generate: Percentiles
    consistency_verify: Percentiles
    consistency_total: Percentiles
    root_latest: Percentiles

    @property
    def appends_per_second(self) -> float:
        return self.entries / self.append_seconds

    def report(self) -> str:
        return "\n".join(
            [
                f"audit core, {self.entries:,} entries (in memory)",
                f"  append               {self.appends_per_second:12,.0f} entries/s "
                f"({self.append_seconds:.2f} s total)",
                f"  root(size)           {self.root_latest}",
                f"  inclusion generate   {self.inclusion_generate}",
                f"  inclusion verify     {self.inclusion_verify}",
                f"  inclusion gen+verify {self.inclusion_total}",
                f"  consistency generate {self.consistency_generate}",
                f"  consistency verify   {self.consistency_verify}",
                f"  consistency gen+ver. {self.consistency_total}",
            ]
        )


def run(entries: int = 1_000_000, samples: int = 2000, seed: int = 0) -> CoreBench:
    """Append ``entries`` small JSON-like entries, then time ``samples`` proofs of
    each kind at random indices and sizes (every proof is also checked)."""
    if entries < 2:
        raise ValueError("need at least 2 entries")
    rng = random.Random(seed)  # noqa: S311 -- benchmark sampling, not security
    log = MerkleLog()
    append = log.append
    started = time.perf_counter()
    for i in range(entries):
        append(b'{"event_id":"%d","type":"authz.decision"}' % i)
    append_seconds = time.perf_counter() - started

    clock = time.perf_counter_ns
    roots: dict[int, bytes] = {}
    root_ns: list[int] = []
    for _ in range(min(samples, 200)):
        size = rng.randint(1, entries)
        t0 = clock()
        roots[size] = log.root(size)
        root_ns.append(clock() - t0)

    inc_gen: list[int] = []
    inc_ver: list[int] = []
    root = log.root()
    for _ in range(samples):
        index = rng.randrange(entries)
        leaf = log.leaf_hash(index)
        t0 = clock()
        proof = log.inclusion_proof(index, entries)
        t1 = clock()
        verify_inclusion(leaf, index, entries, proof, root)
        t2 = clock()
        inc_gen.append(t1 - t0)
        inc_ver.append(t2 - t1)

    con_gen: list[int] = []
    con_ver: list[int] = []
    sizes = list(roots)
    for _ in range(samples):
        first = rng.choice(sizes)
        first_root = roots[first]
        t0 = clock()
        proof = log.consistency_proof(first, entries)
        t1 = clock()
        verify_consistency(first, entries, first_root, root, proof)
        t2 = clock()
        con_gen.append(t1 - t0)
        con_ver.append(t2 - t1)

    return CoreBench(
        entries=entries,
        append_seconds=append_seconds,
        inclusion_generate=Percentiles.of(inc_gen),
        inclusion_verify=Percentiles.of(inc_ver),
        inclusion_total=Percentiles.of([a + b for a, b in zip(inc_gen, inc_ver, strict=True)]),
        consistency_generate=Percentiles.of(con_gen),
        consistency_verify=Percentiles.of(con_ver),
        consistency_total=Percentiles.of([a + b for a, b in zip(con_gen, con_ver, strict=True)]),
        root_latest=Percentiles.of(root_ns),
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    entries = int(args[0]) if args else 1_000_000
    print(run(entries).report())


if __name__ == "__main__":
    main()
