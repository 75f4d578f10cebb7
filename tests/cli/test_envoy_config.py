"""``trustmesh envoy config``: what it prints loads in the real Envoy (``--mode
validate``) with and without mTLS, holds the parts docs/agent-surfaces.md promises, and a
bad flag is one line and exit code 1. (It runs in ``tests/mesh/test_two_envoys.py``.)"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import envoy_validate, trustmesh_cmd


def printed(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trustmesh_cmd("envoy", "config", *flags), capture_output=True, text=True, timeout=60
    )


def manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    typed: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


@pytest.mark.parametrize("mtls", [False, True])
def test_the_printed_configuration_loads_in_envoy(tmp_path: Path, mtls: bool) -> None:
    flags = ["--cluster", "east", "--namespace", "shop"]
    if mtls:
        flags += ["--sds-socket", "/run/trustmesh/sds.sock", "--trust-domain", "corp.example"]
    answer = printed(*flags)
    assert answer.returncode == 0, answer.stderr
    envoy_validate(answer.stdout, tmp_path)
    hcm = manager(yaml.safe_load(answer.stdout))
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    allowed = hcm["http_filters"][1]["typed_config"]["allowed_headers"]["patterns"]
    assert ({"exact": "x-forwarded-client-cert"} in allowed) is mtls
    assert hcm["forward_client_cert_details"] == ("SANITIZE_SET" if mtls else "SANITIZE")


@pytest.mark.parametrize(
    "flags",
    [
        ["--agent", "ftp://127.0.0.1:8181"],
        ["--agent", "http://10.0.0.1:8181", "--agent", "https://10.0.0.2:8181"],
        ["--agent", "http://10.0.0.1:8181", "--agent", "http://10.0.0.1:8181/"],
        ["--listen", "nowhere"],
        ["--egress-listen", "127.0.0.1:15001", "--egress-to", "127.0.0.1:1"],
        ["--sds-socket", "/s", "--trust-domain", "Not A Domain"],
        [
            "--sds-socket",
            "/s",
            "--egress-listen",
            "127.0.0.1:0",
            "--egress-to",
            "127.0.0.1:1",
            "--max-connection-duration",
            "5m",
        ],
        [
            "--sds-socket",
            "/s",
            "--egress-listen",
            "127.0.0.1:0",
            "--egress-to",
            "127.0.0.1:1",
            "--max-connection-duration",
            "0s",
        ],
    ],
)
def test_a_bad_flag_is_one_line(flags: list[str]) -> None:
    answer = printed("--cluster", "east", *flags)
    assert answer.returncode == 1 and answer.stdout == ""
    assert len(answer.stderr.strip().splitlines()) == 1, answer.stderr
    assert answer.stderr.startswith("error: ")


def test_egress_connections_live_a_bounded_time_so_a_rotated_svid_is_presented(
    tmp_path: Path,
) -> None:
    """Envoy takes a rotated SVID for new connections only: the egress cluster's
    connections are drained after ``--max-connection-duration`` (default 300 s), so a busy
    connection never presents an expired certificate (tests/sim/test_demo.py watches the
    serial change at the upstream with calls going on)."""
    flags = ["--cluster", "east", "--sds-socket", "/run/trustmesh/sds.sock"]
    flags += ["--egress-listen", "127.0.0.1:15001", "--egress-to", "127.0.0.1:15002"]
    for extra, expected in (([], "300s"), (["--max-connection-duration", "2.5s"], "2.5s")):
        answer = printed(*flags, *extra)
        assert answer.returncode == 0, answer.stderr
        envoy_validate(answer.stdout, tmp_path)
        clusters = yaml.safe_load(answer.stdout)["static_resources"]["clusters"]
        [egress] = [c for c in clusters if c["name"] == "egress"]
        options = egress["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert options["common_http_protocol_options"] == {"max_connection_duration": expected}
        assert options["explicit_http_config"] == {"http_protocol_options": {}}


@pytest.mark.parametrize(
    ("agent", "san_type", "sni"),
    [("https://agent.trustmesh.svc:8443", "DNS", "agent.trustmesh.svc"),
     ("https://10.0.0.7:8443", "IP_ADDRESS", None)],
)  # fmt: skip
def test_an_https_agent_is_verified_against_its_ca_and_host(
    tmp_path: Path, agent: str, san_type: str, sni: str | None
) -> None:
    answer = printed("--cluster", "east", "--agent", agent, "--agent-ca-file", "/etc/agent-ca.pem")
    assert answer.returncode == 0, answer.stderr
    config = yaml.safe_load(answer.stdout)
    [cluster] = [
        c for c in config["static_resources"]["clusters"] if c["name"] == "trustmesh_agent"
    ]
    tls = cluster["transport_socket"]["typed_config"]
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/agent-ca.pem"}
    host = agent.removeprefix("https://").rsplit(":", 1)[0]
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": san_type, "matcher": {"exact": host}}
    ]
    assert tls.get("sni") == sni
    default = yaml.safe_load(printed("--cluster", "east", "--agent", agent).stdout)
    [cluster] = [
        c for c in default["static_resources"]["clusters"] if c["name"] == "trustmesh_agent"
    ]
    trusted = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert trusted["validation_context"]["trusted_ca"] == {
        "filename": "/etc/ssl/certs/ca-certificates.crt"
    }


def agent_cluster(config: dict[str, Any]) -> dict[str, Any]:
    [cluster] = [
        c for c in config["static_resources"]["clusters"] if c["name"] == "trustmesh_agent"
    ]
    return cluster


@pytest.mark.parametrize(
    ("agents", "kind"),
    [(["http://10.0.0.1:8181", "http://10.0.0.2:8181", "http://10.0.0.3:8181"], "STATIC"),
     (["https://agent-a.trustmesh.svc:8443", "https://10.0.0.2:8443"], "STRICT_DNS")],
)  # fmt: skip
def test_several_agents_are_one_cluster_and_a_failed_check_is_retried_at_another(
    tmp_path: Path, agents: list[str], kind: str
) -> None:
    """Several agent replicas of the cluster (DESIGN §10): the endpoints of one Envoy
    cluster; a check that fails at one is retried once at each other (never the same
    one), and one that keeps failing is left out a while. Envoy runs it in
    tests/agent/test_agent_replicas.py with one agent SIGKILLed."""
    flags = [flag for url in agents for flag in ("--agent", url)]
    answer = printed("--cluster", "east", *flags)
    assert answer.returncode == 0, answer.stderr
    envoy_validate(answer.stdout, tmp_path)
    config = yaml.safe_load(answer.stdout)
    cluster = agent_cluster(config)
    assert cluster["type"] == kind
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in endpoints]
    assert [f"{a['address']}:{a['port_value']}" for a in addresses] == [
        url.split("://")[1] for url in agents
    ]
    assert cluster["outlier_detection"]["consecutive_5xx"] == 2
    ext_authz = manager(config)["http_filters"][1]["typed_config"]["http_service"]
    retry = ext_authz["retry_policy"]
    assert retry["retry_on"] == "5xx" and retry["num_retries"] == len(agents) - 1
    [predicate] = retry["retry_host_predicate"]
    assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"
    if kind == "STRICT_DNS":  # https: a certificate naming any one of the agents
        tls = cluster["transport_socket"]["typed_config"]
        sans = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
        assert sans == [
            {"san_type": "DNS", "matcher": {"exact": "agent-a.trustmesh.svc"}},
            {"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.2"}},
        ]
        assert "sni" not in tls  # two names: none of them for all


def test_one_agent_has_no_retry_to_make() -> None:
    config = yaml.safe_load(printed("--cluster", "east").stdout)
    assert "retry_policy" not in manager(config)["http_filters"][1]["typed_config"]["http_service"]
    assert "outlier_detection" not in agent_cluster(config)
