"""How a used grant's observed paths become the narrower rule: listed while few, else one
glob that still covers every path seen (past the cap of kept values too)."""

from __future__ import annotations

from trustmesh.analytics.report import MAX_DISTINCT, MAX_PATHS, _Paths, _paths


def observed(paths: list[str]) -> list[str]:
    seen = _Paths()
    for path in paths:
        seen.add(path)
    return _paths(seen)


def test_few_paths_are_listed() -> None:
    assert observed(["/api/b", "/api/a", "/api/a"]) == ["/api/a", "/api/b"]


def test_many_paths_of_one_depth_fold_to_single_segment_wildcards() -> None:
    paths = [f"/api/v1/orders/{i}" for i in range(MAX_PATHS + 1)]
    assert observed(paths) == ["/api/v1/orders/*"]


def test_many_paths_of_several_depths_fold_to_a_prefix_and_double_star() -> None:
    paths = [f"/api/v1/{i}" + ("/items" if i % 2 else "") for i in range(MAX_PATHS + 1)]
    assert observed(paths) == ["/api/v1/**"]


def test_a_path_past_the_cap_still_shapes_the_glob() -> None:
    paths = [f"/api/v1/{i}" for i in range(MAX_DISTINCT + 5)] + ["/health"]
    assert observed(paths) == ["/**"]  # /health has fewer segments than the rest
