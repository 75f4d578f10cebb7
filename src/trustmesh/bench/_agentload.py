"""One agent's bundle load, in a fresh process: ``python -m trustmesh.bench._agentload
TOKEN_FILE JWKS_FILE CLUSTER`` reads the signed bundle, verifies and parses it
(``policy.bundle.verify_bundle``) and builds the ``Engine``, as ``agent/policy.py``
installs a bundle (less writing it to disk), then prints one JSON line: the time of
each step, this process's CPU seconds, and its resident memory before the load (after
the imports), after it (the token and the parsed document dropped: what the agent keeps
is the engine and the inventory it references) and at its peak (``VmHWM``)."""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from trustmesh.identity.svid import KeyRing
from trustmesh.policy.bundle import verify_bundle
from trustmesh.policy.engine import Engine

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set now (``/proc/self/statm``), 0 where there is none."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def peak_resident_bytes() -> int:
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` would do but for
    Linux carrying it over ``execve``: a child of a large benchmark process would
    report its parent's peak), 0 where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load(token_file: str, jwks_file: str, cluster: str) -> dict[str, Any]:
    keys = KeyRing(json.loads(Path(jwks_file).read_text()))
    gc.collect()
    before = resident_bytes()
    cpu0 = _cpu()
    t0 = time.perf_counter()
    token = Path(token_file).read_text(encoding="ascii")
    t1 = time.perf_counter()
    bundle = verify_bundle(token, keys, cluster)
    t2 = time.perf_counter()
    engine = Engine(bundle)
    t3 = time.perf_counter()
    cpu = _cpu() - cpu0
    bindings = len(engine.bindings)
    del token, bundle
    gc.collect()
    after = resident_bytes()
    peak = peak_resident_bytes()
    return {
        "read_s": t1 - t0,
        "verify_parse_s": t2 - t1,
        "engine_s": t3 - t2,
        "load_s": t3 - t0,
        "cpu_s": cpu,
        "rss_before": before,
        "rss_after": after,
        "rss_peak": peak,
        "bindings": bindings,
        "identities": len(engine.identities),
        "engine_alive": engine.revision >= 0,  # keeps the engine alive until measured
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m trustmesh.bench._agentload TOKEN_FILE JWKS_FILE CLUSTER")
        return 2
    print(json.dumps(load(*argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
