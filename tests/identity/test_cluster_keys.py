"""Fetching a cluster's SA-token keys over real HTTP: discovery, caching, refresh on an
unknown kid (rate-limited), stale keys when the cluster is down, refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.errors import ClusterKeysTooOld, ClusterKeysUnavailable, InvalidToken
from trustmesh.common.serving import BackgroundServer
from trustmesh.identity.kubernetes_sa import (
    ClusterKeyCache,
    origin,
    parse_unverified,
    verify_service_account_token,
)
from trustmesh.manifests import ClusterSpec
from trustmesh.sim import SimulatedCluster


def spec_for(cluster: SimulatedCluster, **overrides: object) -> ClusterSpec:
    values: dict[str, object] = {
        "issuer": cluster.issuer,
        "jwks": None,
        "jwks_uri": None,
        "audience": "trustmesh",
        "labels": {},
    }
    values.update(overrides)
    return ClusterSpec(**values)  # type: ignore[arg-type]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def keys(cache: ClusterKeyCache, name: str, spec: ClusterSpec, kid: str | None) -> list[str]:
    return (await cache.keys_for(name, spec, kid)).kids()


def test_discovery_fetch_cache_and_refresh_on_new_kid(sim_cluster: SimulatedCluster) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            cache = ClusterKeyCache(client, min_refresh_interval=0.2)
            spec = spec_for(sim_cluster)
            first = sim_cluster.signing_kid
            assert await keys(cache, "c", spec, first) == [first]
            assert await keys(cache, "c", spec, first) == [first]
            assert cache.fetches == 1  # cached
            new = sim_cluster.rotate_key()
            await asyncio.sleep(0.25)
            assert sorted(await keys(cache, "c", spec, new)) == sorted([first, new])
            assert cache.fetches == 2
            token = sim_cluster.mint("shop", "payments")
            ring = await cache.keys_for("c", spec, new)
            verified = verify_service_account_token(parse_unverified(token), ring, spec, leeway=30)
            assert (verified.namespace, verified.service_account) == ("shop", "payments")

    run(scenario())


def test_unknown_kid_flood_is_rate_limited(sim_cluster: SimulatedCluster) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            cache = ClusterKeyCache(client, min_refresh_interval=60.0)
            spec = spec_for(sim_cluster)
            await cache.keys_for("c", spec, sim_cluster.signing_kid)
            results = await asyncio.gather(
                *(cache.keys_for("c", spec, f"garbage-{i}") for i in range(200))
            )
            assert all(r.kids() == [sim_cluster.signing_kid] for r in results)
            assert cache.fetches == 1  # 200 unknown kids, no extra fetch within the interval

    run(scenario())


def test_stale_keys_survive_an_outage_and_nothing_cached_is_unavailable() -> None:
    cluster = SimulatedCluster("flaky").serve()

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            cache = ClusterKeyCache(client, min_refresh_interval=0.0)
            spec = spec_for(cluster)
            kid = cluster.signing_kid
            await cache.keys_for("c", spec, kid)
            cluster.stop()
            # The cluster is down: an unknown kid triggers a failed fetch, the known keys stay.
            assert await keys(cache, "c", spec, "new-kid") == [kid]
            with pytest.raises(ClusterKeysUnavailable, match="cannot be fetched"):
                await cache.keys_for(
                    "other", spec_for(cluster, issuer="http://127.0.0.1:9/nothing"), kid
                )

    run(scenario())


@pytest.fixture
def hostile() -> Iterator[BackgroundServer]:
    """An 'issuer' that lies in its discovery document or answers junk."""

    async def discovery(request: object) -> Response:
        return JSONResponse(
            {"issuer": "https://someone-else.example", "jwks_uri": "http://127.0.0.1:1/jwks"}
        )

    async def huge(request: object) -> Response:
        return Response(b"{" + b" " * (300 * 1024) + b"}", media_type="application/json")

    async def not_jwks(request: object) -> Response:
        return JSONResponse({"hello": "world"})

    app = Starlette(
        routes=[
            Route("/liar/.well-known/openid-configuration", discovery),
            Route("/huge", huge),
            Route("/notjwks", not_jwks),
        ]
    )
    with BackgroundServer(app) as server:
        yield server


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"issuer": "{url}/liar"}, "names issuer"),
        ({"jwks_uri": "{url}/huge"}, "more than"),
        ({"jwks_uri": "{url}/notjwks"}, "not a JWKS"),
        ({"jwks_uri": "http://192.0.2.1/jwks"}, "must use https"),
    ],
)
def test_refusals(
    hostile: BackgroundServer,
    sim_cluster: SimulatedCluster,
    overrides: dict[str, str],
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Why is logged for the operator; the caller learns only that the keys cannot be
    fetched (no URL, no answer of the cluster's servers)."""
    spec = spec_for(sim_cluster, **{k: v.format(url=hostile.url) for k, v in overrides.items()})

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            with pytest.raises(ClusterKeysUnavailable) as caught:
                await ClusterKeyCache(client).keys_for("c", spec, "k")
            assert caught.value.description == "the keys of cluster c cannot be fetched"

    with caplog.at_level("WARNING", logger="trustmesh.identity.kubernetes_sa"):
        run(scenario())
    assert message in caplog.text


def test_discovery_may_point_jwks_uri_only_at_the_issuers_origin(
    sim_cluster: SimulatedCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A member cluster's discovery document naming keys on another port (or any https
    host) is refused; the same URL listed as the Cluster's ``jwksUri`` is allowed."""
    elsewhere = sim_cluster.issuer + "/openid/v1/jwks"  # a real JWKS, on another origin

    async def discovery(request: Request) -> Response:
        issuer = str(request.base_url).rstrip("/") + "/redirector"
        return JSONResponse({"issuer": issuer, "jwks_uri": elsewhere})

    app = Starlette(routes=[Route("/redirector/.well-known/openid-configuration", discovery)])
    with BackgroundServer(app) as redirector:
        issuer = redirector.url + "/redirector"

        async def scenario() -> None:
            async with httpx.AsyncClient() as client:
                cache = ClusterKeyCache(client, min_refresh_interval=0.0)
                with pytest.raises(ClusterKeysUnavailable, match="cannot be fetched"):
                    await cache.keys_for("c", spec_for(sim_cluster, issuer=issuer), None)
                listed = spec_for(sim_cluster, issuer=issuer, jwks_uri=elsewhere)
                assert await keys(cache, "c", listed, None) == [sim_cluster.signing_kid]

        with caplog.at_level("WARNING", logger="trustmesh.identity.kubernetes_sa"):
            run(scenario())
    assert "outside the issuer's origin" in caplog.text


def test_origin_makes_the_port_explicit() -> None:
    assert origin("https://Example.com/a") == origin("https://example.com:443/b")
    assert origin("http://127.0.0.1/x") == ("http", "127.0.0.1", 80)
    assert origin("http://127.0.0.1:8080/x") != origin("http://127.0.0.1:8081/x")
    assert origin("https://example.com") != origin("http://example.com")


def test_stale_keys_are_kept_for_at_most_the_max_age() -> None:
    """On a clock the test moves: the keys of a cluster that went down keep serving
    for --cluster-keys-max-age after their last fetch, then the cluster is refused
    as having keys too old (invalid_grant); when it comes back its keys are fetched again."""
    cluster = SimulatedCluster("down").serve()
    now = [1_000_000.0]

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            cache = ClusterKeyCache(
                client, clock=lambda: now[0], min_refresh_interval=0.0, max_keys_age=86400.0
            )
            spec = spec_for(cluster)
            kid = cluster.signing_kid
            assert await keys(cache, "c", spec, kid) == [kid]
            cluster.stop()
            now[0] += 7200  # past the keys' max-age: a fetch is tried and fails
            assert await keys(cache, "c", spec, kid) == [kid]
            now[0] += 86400 - 7200  # exactly the max age: still in use
            assert await keys(cache, "c", spec, kid) == [kid]
            now[0] += 1
            with pytest.raises(
                ClusterKeysTooOld,
                match="are too old: its last good key set was fetched 86401 s ago",
            ):
                await cache.keys_for("c", spec, kid)

    run(scenario())


def test_keys_older_than_the_max_age_are_fetched_again_while_the_cluster_is_up(
    sim_cluster: SimulatedCluster,
) -> None:
    now = [1_000_000.0]

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            cache = ClusterKeyCache(
                client, clock=lambda: now[0], min_refresh_interval=0.0, max_keys_age=5.0
            )
            spec = spec_for(sim_cluster)
            await cache.keys_for("c", spec, None)
            now[0] += 6  # within the keys' max-age, beyond the max age: fetched again
            assert await keys(cache, "c", spec, None) == [sim_cluster.signing_kid]
            assert cache.fetches == 2

    run(scenario())


def test_inline_jwks_needs_no_network(sim_cluster: SimulatedCluster) -> None:
    spec = spec_for(sim_cluster, jwks=sim_cluster.jwks())

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            cache = ClusterKeyCache(client)
            ring = await cache.keys_for("c", spec, "whatever")
            assert cache.fetches == 0
            verify_service_account_token(
                parse_unverified(sim_cluster.mint("a", "b")), ring, spec, leeway=30
            )
            with pytest.raises(InvalidToken) as caught:
                verify_service_account_token(
                    parse_unverified(sim_cluster.mint("a", "b", audience="other")), ring, spec, 30
                )
            assert caught.value.reason == "wrong_audience"

    run(scenario())
