"""trustmesh.client.TokenSource against a real control plane: the lease (refresh at
about 80 % with jitter), failover, backoff while every server is down, never an
expired token, the subject token file re-read, refusals surfaced clearly."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import jwt
import pytest
from client_support import FakeClock, Network, dead_url

from helpers import Federation
from trustmesh.client import AsyncTokenSource, ExchangeRejected, TokenSource, TokenUnavailable
from trustmesh.common.backoff import Backoff


def claims(token: str) -> dict[str, object]:
    decoded: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def test_fetches_once_and_refreshes_at_80_percent(
    client_fed: Federation, sa_file: Path, network: Network
) -> None:
    clock = FakeClock()
    with TokenSource(
        [client_fed.server.url],
        sa_file,
        [client_fed.audience],
        lifetime=10,
        jitter=0,
        clock=clock,
        http_client=httpx.Client(transport=network),
    ) as source:
        first = source.token()
        body = claims(first)
        assert body["aud"] == [client_fed.audience]
        assert body["exp"] == body["iat"] + 10  # type: ignore[operator]
        lease = source.lease
        assert lease is not None and lease.lifetime == 10
        assert lease.refresh_at == pytest.approx(clock.now + 8)
        assert len(network.requests) == 1

        clock.advance(7.9)
        assert source.token() == first
        assert len(network.requests) == 1  # no network while the lease is young

        clock.advance(0.2)
        second = source.token()
        assert second != first and claims(second)["jti"] != body["jti"]
        assert len(network.requests) == 2


def test_refresh_points_are_jittered(client_fed: Federation, sa_file: Path) -> None:
    with TokenSource(
        [client_fed.server.url], sa_file, [client_fed.audience], lifetime=10
    ) as source:
        offsets = []
        for _ in range(10):
            lease = source.refresh()
            offsets.append(lease.refresh_at - lease.issued_at)
    assert all(7.0 - 1e-6 <= offset <= 9.0 + 1e-6 for offset in offsets), offsets
    assert len({round(offset, 3) for offset in offsets}) > 1, "no jitter"


def test_fails_over_and_then_prefers_the_url_that_answered(
    client_fed: Federation, sa_file: Path, network: Network
) -> None:
    dead, alive = dead_url(), client_fed.server.url
    with TokenSource(
        [dead, alive], sa_file, [client_fed.audience], http_client=httpx.Client(transport=network)
    ) as source:
        assert claims(source.token())["sub"]
        assert network.requests == [dead, alive]
        assert source.lease is not None and source.lease.server == alive
        source.refresh()
        assert network.requests[2:] == [alive]


def test_keeps_serving_and_backs_off_while_every_server_is_down(
    client_fed: Federation, sa_file: Path, network: Network
) -> None:
    clock = FakeClock()
    errors: list[tuple[str, float]] = []
    with TokenSource(
        [client_fed.server.url],
        sa_file,
        [client_fed.audience],
        lifetime=20,  # refresh at 16 s; handed out until 18 s (margin: a tenth)
        jitter=0,
        clock=clock,
        http_client=httpx.Client(transport=network),
        backoff=Backoff(base=1.0, factor=2.0, cap=4.0),
        on_error=lambda exc, retry_in: errors.append((str(exc), retry_in)),
    ) as source:
        first = source.token()
        network.down = True

        clock.advance(16)
        assert source.token() == first  # the refresh failed; the lease still serves
        assert len(network.requests) == 2 and len(errors) == 1
        assert "no control plane answered" in errors[0][0]
        assert 0.5 <= errors[0][1] <= 1.0  # first backoff step

        assert source.token() == first
        assert len(network.requests) == 2  # backing off: no new attempt

        clock.advance(1.0)
        assert source.token() == first
        assert len(network.requests) == 3
        assert errors[1][1] <= 1.0 + 1e-6  # clamped: one last try before the margin

        clock.advance(1.5)  # 18.5 s: inside the safety margin
        with pytest.raises(TokenUnavailable, match="inside the safety margin") as inside:
            source.token()
        assert not isinstance(inside.value, ExchangeRejected)

        clock.advance(3)  # 21.5 s: expired
        with pytest.raises(TokenUnavailable) as expired:
            source.token()
        message = str(expired.value)
        assert "expired" in message and "no control plane answered" in message
        assert "ConnectError" in message

        network.down = False
        clock.advance(10)  # past any backoff step
        fresh = source.token()
        assert fresh != first and claims(fresh)["sub"] == claims(first)["sub"]


def test_no_token_at_all_raises_and_backs_off(client_fed: Federation, sa_file: Path) -> None:
    dead = dead_url()
    clock = FakeClock()
    with TokenSource([dead], sa_file, [client_fed.audience], clock=clock) as source:
        with pytest.raises(TokenUnavailable, match="no token has been issued yet") as first:
            source.token()
        assert dead in str(first.value)
        with pytest.raises(TokenUnavailable, match="next attempt in"):
            source.token()


def test_subject_token_file_is_reread_and_invalid_grant_is_clear(
    client_fed: Federation, tmp_path: Path, network: Network
) -> None:
    path = tmp_path / "token"
    path.write_text(client_fed.sa_token(now=time.time() - 7200, ttl=600))  # long expired
    clock = FakeClock()
    with TokenSource(
        [client_fed.server.url, dead_url()],
        str(path),
        [client_fed.audience],
        clock=clock,
        http_client=httpx.Client(transport=network),
        backoff=Backoff(base=1.0, cap=2.0),
    ) as source:
        with pytest.raises(ExchangeRejected) as refused:
            source.token()
        error = refused.value
        assert error.error == "invalid_grant" and error.status == 400
        assert "expired" in error.description
        assert error.description in str(error) and "invalid_grant" in str(error)
        assert network.requests == [client_fed.server.url]  # not tried on the other URL

        with pytest.raises(ExchangeRejected, match="invalid_grant"):
            source.token()
        assert len(network.requests) == 1  # not retried blindly

        path.write_text(client_fed.sa_token())  # kubelet rotates the projected token
        clock.advance(3)
        assert claims(source.token())["service_account"] == "payments"


def test_one_refresh_at_a_time(client_fed: Federation, sa_file: Path, network: Network) -> None:
    with TokenSource(
        [client_fed.server.url],
        sa_file,
        [client_fed.audience],
        http_client=httpx.Client(transport=network),
    ) as source:
        barrier = threading.Barrier(8)
        tokens: list[str] = []

        def call() -> None:
            barrier.wait()
            tokens.append(source.token())

        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(set(tokens)) == 1 and len(tokens) == 8
    assert len(network.requests) == 1


def test_async_token_source(client_fed: Federation, sa_file: Path) -> None:
    clock = FakeClock()

    async def scenario() -> tuple[str, str, str]:
        async with AsyncTokenSource(
            [dead_url(), client_fed.server.url],
            sa_file,
            [client_fed.audience],
            lifetime=10,
            jitter=0,
            clock=clock,
        ) as source:
            first = await source.token()
            clock.advance(5)
            same = await source.token()
            clock.advance(4)
            return first, same, await source.token()

    first, same, refreshed = asyncio.run(scenario())
    assert first == same != refreshed


def test_rejects_bad_arguments(sa_file: Path) -> None:
    with pytest.raises(ValueError, match="at least one control-plane URL"):
        TokenSource([], sa_file, ["aud"])
    with pytest.raises(ValueError, match="http"):
        TokenSource(["cp.example:8443"], sa_file, ["aud"])
    with pytest.raises(ValueError, match="audience"):
        TokenSource(["http://cp"], sa_file, [])
    with pytest.raises(TypeError, match="looks like a token") as raw:
        TokenSource(["http://cp"], "eyJhbGciOiJFUzI1NiJ9.e30.sig", ["aud"])
    assert "eyJ" not in str(raw.value)
