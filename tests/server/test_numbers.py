"""Numbers from the network have one reading (issue 10, finding 9): ASCII digits only,
bounded in length. Every parameter that carries one is tried through real HTTP against
a real control plane with Unicode digits (``٣`` is 3 to ``int()``), digits that
``isdigit`` accepts and ``int`` refuses (``²``), signs, spaces, underscores and
too many digits: each is a 400 naming the parameter (never a 500, never read as a
number), and plain ASCII still works."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import Federation, Server, register_federation, serve_cluster, start_server, unique
from trustmesh.common.errors import InvalidRequest
from trustmesh.common.numbers import parse_decimal, require_decimal

ARABIC_INDIC = str.maketrans("0123456789", "".join(chr(0x660 + d) for d in range(10)))
NOT_NUMBERS = [
    "\u0663",
    "\u00b2",
    "\uff11",
    "+1",
    "-1",
    " 1",
    "1 ",
    "1_0",
    "1e3",
    "0x1",
    "1.0",
    "9" * 19,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = start_server(tmp_path_factory.mktemp("numbers") / "data")
    yield started
    assert started.stop() == 0


@pytest.fixture(scope="module")
def fed(server: Server) -> Iterator[Federation]:
    with serve_cluster("numbers") as cluster:
        yield register_federation(server, cluster)


def refused(response: httpx.Response, name: str) -> None:
    assert response.status_code == 400, (response.status_code, response.text)
    body = response.json()
    assert body["error"] == "invalid_request" and name in body["error_description"], body


@pytest.mark.parametrize(
    "value", ["\u0663", "\u00b2", "\uff11", "+60", " 60", "6_0", "60.0", "9" * 10]
)
def test_lifetime(fed: Federation, value: str) -> None:
    """``lifetime=²`` was a 500 with no audit event, ``lifetime=٣`` a 3-second token."""
    response = fed.server.exchange(fed.sa_token(), fed.audience, lifetime=value)
    refused(response, "lifetime")

    # The refusal is audited like any other.
    def mentions_lifetime(events: list[dict[str, Any]]) -> bool:
        return any("lifetime" in e["decision"]["reason"] for e in events)

    assert mentions_lifetime(
        fed.server.audit_events_until("token.exchange_failed", mentions_lifetime)
    )
    ok = fed.server.exchange(fed.sa_token(), fed.audience, lifetime="60")
    assert ok.status_code == 200 and ok.json()["expires_in"] == 60


@pytest.mark.parametrize(
    ("path", "params", "name", "good"),
    [
        ("/v1/revocations", {"since": "{n}"}, "since", "0"),
        ("/v1/audit/checkpoints", {"after": "{n}"}, "after", "0"),
        ("/v1/audit/proof/inclusion", {"index": "{n}", "size": "1"}, "index", "0"),
        ("/v1/audit/proof/inclusion", {"index": "0", "size": "{n}"}, "size", "1"),
        ("/v1/audit/proof/consistency", {"first": "{n}", "second": "1"}, "first", "1"),
        ("/v1/audit/proof/consistency", {"first": "1", "second": "{n}"}, "second", "1"),
        ("/v1/audit/entries", {"start": "{n}"}, "start", "0"),
        ("/v1/audit/entries", {"start": "0", "end": "{n}"}, "end", "1"),
        ("/v1/audit/query", {"after": "{n}"}, "after", "0"),
        ("/v1/audit/query", {"limit": "{n}"}, "limit", "1"),
        ("/v1/agent/bundle", {"cluster": "{cluster}", "after": "{n}.1"}, "after", "1"),
        ("/v1/agent/bundle", {"cluster": "{cluster}", "after": "1.{n}"}, "after", "1"),
    ],
)
def test_query_parameters(
    server: Server, fed: Federation, path: str, params: dict[str, str], name: str, good: str
) -> None:
    for bad in NOT_NUMBERS:
        filled = {k: v.format(n=bad, cluster=fed.target_name) for k, v in params.items()}
        refused(server.admin.get(path, params=filled), name)
    filled = {k: v.format(n=good, cluster=fed.target_name) for k, v in params.items()}
    answer = server.admin.get(path, params=filled)
    assert answer.status_code in (200, 304), answer.text


def test_policy_revision_path_parameter(server: Server, fed: Federation) -> None:
    """``/v1/policy/versions/`` + ARABIC-INDIC DIGIT ONE was revision 1."""
    for bad in ["\u0661", "\u00b2", "\uff11", "+1", "1_0", "9" * 19]:
        refused(server.admin.get(f"/v1/policy/versions/{bad}"), "revision")
    assert server.admin.get("/v1/policy/versions/0").status_code in (200, 404)


def test_last_event_id_is_never_read_from_other_digits(server: Server) -> None:
    """Header values arrive as Latin-1: a ``Last-Event-ID`` of ``²`` (0xB2) passed
    ``isdigit`` and made ``int`` fail, a 500. It is no resume point now: the stream starts
    from ``since`` (0), so it replays the revocations in force."""
    first = server.admin.post(
        "/v1/revocations", json={"kind": "jti", "value": unique("j-"), "reason": "t"}
    ).json()["revocation"]["revision"]

    def first_event_id(last_event_id: bytes) -> int:
        with server.admin.stream(
            "GET", "/v1/revocations/stream", headers={"Last-Event-ID": last_event_id}
        ) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("id: "):
                    return int(line[4:])
        raise AssertionError("the stream ended without an event")

    for bad in [b"\xb2", b"1\xb9", b"+1", b"9" * 19]:
        assert first_event_id(bad) <= first
    assert first_event_id(str(first - 1).encode()) == first  # ASCII resumes as before


def test_ssf_ack_names_only_the_jti_we_issued(server: Server, fed: Federation) -> None:
    """Acknowledging ``R-٣`` (or ``R-03``) acknowledged the SET ``R-3``."""
    token = server.credential(fed.target_name)
    headers = {"Authorization": f"Bearer {token}"}

    def poll(body: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(server.url + "/v1/ssf/poll", json=body, headers=headers, timeout=40)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    server.admin.post("/v1/revocations", json={"kind": "jti", "value": unique("j-"), "reason": "t"})
    pending = poll({"returnImmediately": True, "maxEvents": 1000})["sets"]
    assert pending
    jti = sorted(pending, key=lambda j: int(j.rsplit("-", 1)[1]))[-1]
    receiver, revision = jti.rsplit("-", 1)
    spellings = [
        f"{receiver}-{revision.translate(ARABIC_INDIC)}",
        f"{receiver}-0{revision}",
        f"{receiver}-+{revision}",
    ]
    poll({"ack": spellings, "maxEvents": 0})
    assert jti in poll({"returnImmediately": True, "maxEvents": 1000})["sets"]
    poll({"ack": [jti], "maxEvents": 0})
    assert jti not in poll({"returnImmediately": True, "maxEvents": 1000})["sets"]


@given(st.text(max_size=25))
def test_parse_decimal_reads_ascii_digits_only(text: str) -> None:
    value = parse_decimal(text)
    is_decimal = 0 < len(text) <= 18 and all("0" <= c <= "9" for c in text)
    assert (value is not None) == is_decimal
    if value is not None:
        assert value == int(text) and 0 <= value < 10**18


@given(st.integers(min_value=0, max_value=10**18 - 1))
def test_every_non_negative_integer_reads_back(number: int) -> None:
    assert parse_decimal(str(number)) == number
    assert require_decimal(str(number), "n") == number


def test_require_decimal_names_the_parameter() -> None:
    with pytest.raises(InvalidRequest, match="since must be a non-negative integer"):
        require_decimal("\u0663", "since")
    assert parse_decimal("007") == 7
    assert parse_decimal(None) is None and parse_decimal("") is None


def test_cache_control_max_age_reads_ascii_digits_only() -> None:
    from trustmesh.identity.kubernetes_sa import _MAX_AGE

    assert _MAX_AGE.search("public, max-age=٣٠٠") is None
    match = _MAX_AGE.search("max-age=300")
    assert match is not None and match.group(1) == "300"
    assert _MAX_AGE.search("max-age=" + "9" * 12) is None


def test_listen_port_reads_ascii_digits_only(tmp_path: Path) -> None:
    from trustmesh.common.addresses import parse_listen

    assert parse_listen("127.0.0.1:8443") == ("127.0.0.1", 8443)
    for bad in ["127.0.0.1:\u0668\u0660", "127.0.0.1:+80", "127.0.0.1:99999", "127.0.0.1: 80"]:
        with pytest.raises(ValueError, match="is not HOST:PORT"):
            parse_listen(bad)


@pytest.mark.parametrize("path", ["/v1/revocations", "/v1/agent/bundle"])
def test_wait_is_a_plain_number_of_seconds(server: Server, fed: Federation, path: str) -> None:
    """``wait=nan`` slipped through ``min``/``max`` as a float; ``inf``, exponents,
    signs and other digits were read as numbers too."""
    params = {"cluster": fed.target_name, "after": "0.0"} if "bundle" in path else {}
    for bad in ["nan", "inf", "-1", "1e3", "\u0663", "+1", "1.5.2", "0x10", " 1"]:
        refused(server.admin.get(path, params={**params, "wait": bad}), "wait")
    for good in ["0", "0.5", "1"]:
        answer = server.admin.get(path, params={**params, "wait": good})
        assert answer.status_code in (200, 304), answer.text
