"""Every rule of DESIGN §3 fails with the right field path and 1-based line."""

from __future__ import annotations

from pathlib import Path

import pytest
from manifest_samples import CLUSTER, WORKLOAD, only_problem, problems_of

from trustmesh.common.errors import ManifestError
from trustmesh.manifests import Problem, load_paths, parse_text

HEAD = "apiVersion: trustmesh.io/v1alpha1\nkind: {kind}\nmetadata:\n  name: x\nspec:\n"
# spec content of these samples starts on line 6
CLUSTER_HEAD = HEAD.format(kind="Cluster")
ISSUER = "  issuer: https://i.example\n"
KEYS = "  jwks:\n    keys:\n"  # the first key starts on line 9 (after ISSUER)
WORKLOAD_HEAD = HEAD.format(kind="Workload")
SELECTOR = "  selector: {cluster: east, namespace: ns, serviceAccount: sa}\n"  # line 6


def ec_key(**extra: str) -> str:
    members = {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "BBBB", **extra}
    return "      - " + "\n        ".join(f"{k}: {v}" for k, v in members.items()) + "\n"


CASES: list[tuple[str, str, int, str, str]] = [
    # (id, text, line, field, message fragment)
    # --- top level
    ("not a mapping", "- a\n- b\n", 1, "", "a manifest must be a mapping, got a list"),
    ("scalar document", "hello\n", 1, "", "must be a mapping, got a string"),
    (
        "wrong apiVersion",
        CLUSTER.replace("trustmesh.io/v1alpha1", "v1"),
        1,
        "apiVersion",
        "apiVersion must be 'trustmesh.io/v1alpha1', got 'v1'",
    ),
    (
        "unknown kind",
        CLUSTER.replace("kind: Cluster", "kind: Clustr"),
        2,
        "kind",
        "unknown kind 'Clustr'; did you mean 'Cluster'?; known kinds: Cluster, Workload",
    ),
    (
        "unknown top-level field",
        CLUSTER + "status: {}\n",
        14,
        "status",
        "unknown field 'status'",
    ),
    ("missing spec", CLUSTER_HEAD.replace("spec:\n", ""), 1, "spec", "required field is missing"),
    ("missing kind", CLUSTER.replace("kind: Cluster\n", ""), 1, "kind", "required field"),
    ("kind not a string", CLUSTER.replace("kind: Cluster", "kind: 3"), 2, "kind", "got an integer"),
    # --- metadata
    (
        "bad name",
        CLUSTER.replace("name: east", "name: East_1"),
        4,
        "metadata.name",
        "'East_1' is not a DNS-1123 label",
    ),
    (
        "long name",
        CLUSTER.replace("name: east", "name: " + "a" * 64),
        4,
        "metadata.name",
        "not a DNS-1123 label",
    ),
    (
        "name ends with dash",
        CLUSTER.replace("name: east", "name: east-"),
        4,
        "metadata.name",
        "DNS-1123",
    ),
    (
        "missing name",
        CLUSTER.replace("  name: east\n", "  labels: {}\n"),
        3,
        "metadata.name",
        "required field is missing",
    ),
    (
        "unknown metadata field",
        CLUSTER.replace("  name: east\n", "  name: east\n  namespace: default\n"),
        5,
        "metadata.namespace",
        "unknown field 'namespace'",
    ),
    (
        "label value not a string",
        CLUSTER.replace("  name: east\n", "  name: east\n  labels:\n    ready: yes\n"),
        6,
        "metadata.labels.ready",
        'expected a string, got a boolean; quote it ("yes")',
    ),
    (
        "annotations not a map",
        CLUSTER.replace("  name: east\n", "  name: east\n  annotations: [a]\n"),
        5,
        "metadata.annotations",
        "expected a mapping, got a list",
    ),
    # --- Cluster.spec
    (
        "http issuer",
        CLUSTER_HEAD + "  issuer: http://oidc.example\n",
        6,
        "spec.issuer",
        "must use https (plain http is allowed only on loopback)",
    ),
    ("relative issuer", CLUSTER_HEAD + "  issuer: /oidc\n", 6, "spec.issuer", "not an absolute"),
    (
        "issuer with query",
        CLUSTER_HEAD + "  issuer: https://i.example/?a=b\n",
        6,
        "spec.issuer",
        "must not have a query or fragment",
    ),
    (
        "issuer with fragment",
        CLUSTER_HEAD + "  issuer: 'https://i.example/#x'\n",
        6,
        "spec.issuer",
        "must not have a query or fragment",
    ),
    (
        "issuer with bad port",
        CLUSTER_HEAD + "  issuer: https://i.example:99999/\n",
        6,
        "spec.issuer",
        "out of range",
    ),
    ("missing issuer", CLUSTER_HEAD + "  audience: a\n", 5, "spec.issuer", "required field"),
    (
        "http jwksUri",
        CLUSTER_HEAD + ISSUER + "  jwksUri: http://10.0.0.1/keys\n",
        7,
        "spec.jwksUri",
        "must use https",
    ),
    (
        "jwks and jwksUri",
        CLUSTER_HEAD + ISSUER + KEYS + ec_key() + "  jwksUri: https://i.example/k\n",
        13,
        "spec.jwksUri",
        "'jwks' and 'jwksUri' are mutually exclusive",
    ),
    (
        "jwksUri and jwksUris",
        CLUSTER_HEAD
        + ISSUER
        + "  jwksUri: https://i.example/k\n  jwksUris: [https://m.example/k]\n",
        8,
        "spec.jwksUris",
        "'jwksUri' and 'jwksUris' are mutually exclusive; give one of jwks, jwksUri or jwksUris",
    ),
    (
        "jwks and jwksUris",
        CLUSTER_HEAD + ISSUER + KEYS + ec_key() + "  jwksUris: [https://i.example/k]\n",
        13,
        "spec.jwksUris",
        "'jwks' and 'jwksUris' are mutually exclusive",
    ),
    (
        "empty jwksUris",
        CLUSTER_HEAD + ISSUER + "  jwksUris: []\n",
        7,
        "spec.jwksUris",
        "at least 1",
    ),
    (
        "jwksUris not a list",
        CLUSTER_HEAD + ISSUER + "  jwksUris: https://i.example/k\n",
        7,
        "spec.jwksUris",
        "expected a list, got a string",
    ),
    (
        "http in jwksUris",
        CLUSTER_HEAD + ISSUER + "  jwksUris: [https://i.example/k, http://10.0.0.1/k]\n",
        7,
        "spec.jwksUris[1]",
        "must use https (plain http is allowed only on loopback)",
    ),
    (
        "jwksUris with a query",
        CLUSTER_HEAD + ISSUER + '  jwksUris: ["https://i.example/k?x=1"]\n',
        7,
        "spec.jwksUris[0]",
        "must not have a query or fragment",
    ),
    (
        "a URL listed twice in jwksUris",
        CLUSTER_HEAD + ISSUER + "  jwksUris:\n  - https://i.example/k\n  - https://i.example/k\n",
        9,
        "spec.jwksUris[1]",
        "'https://i.example/k' is listed twice",
    ),
    (
        "too many jwksUris",
        CLUSTER_HEAD
        + ISSUER
        + "  jwksUris: ["
        + ", ".join(f"https://i.example/{n}" for n in range(9))
        + "]\n",
        7,
        "spec.jwksUris",
        "at most 8",
    ),
    (
        "audience not a string",
        CLUSTER_HEAD + ISSUER + "  audience: 42\n",
        7,
        "spec.audience",
        "expected a string, got an integer",
    ),
    (
        "empty audience",
        CLUSTER_HEAD + ISSUER + "  audience: ''\n",
        7,
        "spec.audience",
        "must not be empty",
    ),
    (
        "labels not a map",
        CLUSTER_HEAD + ISSUER + "  labels: prod\n",
        7,
        "spec.labels",
        "expected a mapping, got a string",
    ),
    (
        "misspelt jwksUri",
        CLUSTER_HEAD + ISSUER + "  jwksURI: https://i.example/k\n",
        7,
        "spec.jwksURI",
        "did you mean 'jwksUri'?",
    ),
    # --- JWKS
    ("jwks without keys", CLUSTER_HEAD + ISSUER + "  jwks: {}\n", 7, "spec.jwks.keys", "required"),
    ("empty keys", CLUSTER_HEAD + ISSUER + KEYS[:-1] + " []\n", 8, "spec.jwks.keys", "at least 1"),
    (
        "private EC key",
        CLUSTER_HEAD + ISSUER + KEYS + ec_key(d="CCCC"),
        13,
        "spec.jwks.keys[0].d",
        "'d' is a private-key member; a JWKS must hold only public keys",
    ),
    (
        "private RSA key",
        CLUSTER_HEAD + ISSUER + KEYS + "      - {kty: RSA, n: AA, e: AQAB, qi: BB}\n",
        9,
        "spec.jwks.keys[0].qi",
        "private-key member",
    ),
    (
        "oct key",
        CLUSTER_HEAD + ISSUER + KEYS + "      - kty: oct\n        k: c2VjcmV0\n",
        9,
        "spec.jwks.keys[0].kty",
        "symmetric keys (kty 'oct') are secrets",
    ),
    (
        "unknown kty",
        CLUSTER_HEAD + ISSUER + KEYS + "      - kty: OKP\n",
        9,
        "spec.jwks.keys[0].kty",
        "unsupported key type 'OKP'; use EC, RSA",
    ),
    (
        "bad curve",
        CLUSTER_HEAD + ISSUER + KEYS + ec_key(crv="P-255"),
        10,
        "spec.jwks.keys[0].crv",
        "'P-255' is not one of P-256, P-384, P-521; did you mean 'P-256'?",
    ),
    (
        "kid not a string",
        CLUSTER_HEAD + ISSUER + KEYS + ec_key(kid="7"),
        13,
        "spec.jwks.keys[0].kid",
        "expected a string, got an integer",
    ),
    (
        "missing y",
        CLUSTER_HEAD + ISSUER + KEYS + "      - {kty: EC, crv: P-256, x: AA}\n",
        9,
        "spec.jwks.keys[0].y",
        "required field is missing",
    ),
    (
        "not base64url",
        CLUSTER_HEAD + ISSUER + KEYS + ec_key(x="'AA=='"),
        11,
        "spec.jwks.keys[0].x",
        "base64url",
    ),
    (
        "duplicate kid",
        CLUSTER_HEAD + ISSUER + KEYS + ec_key(kid="a") + ec_key(kid="a"),
        18,
        "spec.jwks.keys[1].kid",
        "duplicate kid 'a'",
    ),
    # --- Workload.spec
    ("missing selector", WORKLOAD_HEAD + "  claims: {}\n", 5, "spec.selector", "required"),
    (
        "misspelt serviceAccount",
        WORKLOAD_HEAD
        + "  selector:\n    cluster: east\n    namespace: ns\n    serviceAcount: sa\n",
        9,
        "spec.selector.serviceAcount",
        "unknown field 'serviceAcount'; did you mean 'serviceAccount'?",
    ),
    (
        "bad namespace",
        WORKLOAD_HEAD + "  selector: {cluster: east, namespace: Pay, serviceAccount: sa}\n",
        6,
        "spec.selector.namespace",
        "not a DNS-1123 label",
    ),
    (
        "bad cluster",
        WORKLOAD_HEAD + "  selector: {cluster: e.ast, namespace: ns, serviceAccount: sa}\n",
        6,
        "spec.selector.cluster",
        "not a DNS-1123 label",
    ),
    (
        "bad serviceAccount",
        WORKLOAD_HEAD + "  selector: {cluster: e, namespace: ns, serviceAccount: sa..b}\n",
        6,
        "spec.selector.serviceAccount",
        "not a DNS-1123 subdomain",
    ),
    (
        "podLabels refused",
        WORKLOAD_HEAD + SELECTOR[:-2] + ", podLabels: {app: api}}\n",
        6,
        "spec.selector.podLabels",
        "pod-label selectors need pod attestation, which this version does not have; "
        "select by namespace and serviceAccount",
    ),
    (
        "bad spiffeId",
        WORKLOAD_HEAD + SELECTOR + "  spiffeId: spiffe://corp.example\n",
        7,
        "spec.spiffeId",
        "must have a path",
    ),
    (
        "claim not a string",
        WORKLOAD_HEAD + SELECTOR + "  claims:\n    tier: 1\n",
        8,
        "spec.claims.tier",
        'expected a string, got an integer; quote it ("1")',
    ),
    (
        "empty claim",
        WORKLOAD_HEAD + SELECTOR + "  claims:\n    project: ''\n",
        8,
        "spec.claims.project",
        "must not be empty",
    ),
    (
        "long claim",
        WORKLOAD_HEAD + SELECTOR + "  claims:\n    project: " + "p" * 254 + "\n",
        8,
        "spec.claims.project",
        "at most 253 characters",
    ),
    (
        "reserved claim",
        WORKLOAD_HEAD + SELECTOR + "  claims:\n    aud: everyone\n",
        8,
        "spec.claims.aud",
        "'aud' is a reserved token claim",
    ),
    (
        "reserved claim namespace",
        WORKLOAD_HEAD + SELECTOR + "  claims:\n    service_account: x\n",
        8,
        "spec.claims.service_account",
        "reserved token claim",
    ),
    (
        "bad claim key",
        WORKLOAD_HEAD + SELECTOR + "  claims:\n    Team: x\n",
        8,
        "spec.claims.Team",
        "claim name 'Team' must match",
    ),
    (
        "ttl too long",
        WORKLOAD_HEAD + SELECTOR + "  maxTokenTTL: 2h\n",
        7,
        "spec.maxTokenTTL",
        "must be between 1 and 3600 seconds, got 7200",
    ),
    (
        "ttl zero",
        WORKLOAD_HEAD + SELECTOR + "  maxTokenTTL: 0\n",
        7,
        "spec.maxTokenTTL",
        "must be between 1 and 3600 seconds, got 0",
    ),
    (
        "ttl boolean",
        WORKLOAD_HEAD + SELECTOR + "  maxTokenTTL: true\n",
        7,
        "spec.maxTokenTTL",
        "got a boolean",
    ),
    (
        "ttl bad string",
        WORKLOAD_HEAD + SELECTOR + "  maxTokenTTL: 5 minutes\n",
        7,
        "spec.maxTokenTTL",
        "'5 minutes' is not an integer number of seconds or a duration",
    ),
    (
        "ttl unitless string",
        WORKLOAD_HEAD + SELECTOR + "  maxTokenTTL: '300'\n",
        7,
        "spec.maxTokenTTL",
        "is not an integer number of seconds",
    ),
    (
        "ttl float",
        WORKLOAD_HEAD + SELECTOR + "  maxTokenTTL: 1.5\n",
        7,
        "spec.maxTokenTTL",
        "got a number",
    ),
    (
        "selector not a mapping",
        WORKLOAD_HEAD + "  selector:\n    - east\n",
        6,
        "spec.selector",
        "expected a mapping, got a list",
    ),
    # --- canonical requests (DESIGN §3): Cluster.clusterDomain, service rules, PolicyTests
    (
        "cluster domain with a trailing dot",
        CLUSTER_HEAD + ISSUER + "  clusterDomain: cluster.local.\n",
        7,
        "spec.clusterDomain",
        "not a DNS-1123 subdomain",
    ),
    (
        "cluster domain in upper case",
        CLUSTER_HEAD + ISSUER + "  clusterDomain: Corp.Internal\n",
        7,
        "spec.clusterDomain",
        "not a DNS-1123 subdomain",
    ),
    (
        "path case of a resource rule",
        HEAD.format(kind="GlobalRole")
        + "  rules:\n  - apiGroups: ['']\n    resources: [pods]\n    verbs: [get]\n"
        + "    pathCase: insensitive\n",
        10,
        "spec.rules[0].pathCase",
        "pathCase applies to service rules only",
    ),
    (
        "path case neither sensitive nor insensitive",
        HEAD.format(kind="GlobalRole")
        + "  rules:\n  - services: ['*']\n    paths: ['*']\n    methods: [GET]\n"
        + "    pathCase: folded\n",
        10,
        "spec.rules[0].pathCase",
        "'folded'",
    ),
    (
        "policy test request with an empty segment",
        HEAD.format(kind="PolicyTest")
        + "  cases:\n  - subject: {workload: w}\n    cluster: east\n"
        + "    request: {host: admin.shop.svc, path: //admin/users, method: GET}\n"
        + "    expect: deny\n",
        9,
        "spec.cases[0].request",
        "field path contains an empty segment (//)",
    ),
    (
        "policy test request with a control character in the host",
        HEAD.format(kind="PolicyTest")
        + "  cases:\n  - subject: {workload: w}\n    cluster: east\n"
        + '    request: {host: "admin\\e[2J.shop.svc", path: /, method: GET}\n'
        + "    expect: deny\n",
        9,
        "spec.cases[0].request",
        "field host contains a control character (U+001B)",
    ),
    # --- YAML level
    (
        "duplicate key",
        WORKLOAD + "  selector: {}\n",
        10,
        "spec.selector",
        "duplicate field (first given on line 6)",
    ),
    (
        "syntax error",
        CLUSTER_HEAD + "  issuer: [unclosed\n",
        7,
        "",
        "invalid YAML",
    ),
    (
        "non-string key",
        CLUSTER.replace("  name: east\n", "  name: east\n  1: x\n"),
        5,
        "metadata",
        "field names must be strings, got an integer; quote it ('1')",
    ),
    (
        "timestamp",
        CLUSTER.replace("name: east", "name: 2024-01-01"),
        4,
        "metadata.name",
        "expected a string, got a timestamp",
    ),
    (
        "custom tag",
        CLUSTER.replace("name: east", "name: !secret east"),
        4,
        "metadata.name",
        "unsupported or invalid value with tag '!secret'",
    ),
    (
        "bad explicit bool",
        CLUSTER_HEAD + ISSUER + "  audience: !!bool maybe\n",
        7,
        "spec.audience",
        "unsupported or invalid value with tag 'tag:yaml.org,2002:bool'",
    ),
    (
        "python tag",
        CLUSTER_HEAD + ISSUER + "  audience: !!python/name:os.system x\n",
        7,
        "spec.audience",
        "unsupported or invalid value",
    ),
    (
        "deep nesting",
        CLUSTER_HEAD + ISSUER + "  labels: " + "[" * 2000 + "]" * 2000 + "\n",
        1,
        "",
        "nesting is too deep",
    ),
    (
        "bad character",
        CLUSTER_HEAD + ISSUER + "  audience: a\x07b\n",
        7,
        "",
        "special characters are not allowed",
    ),
    (
        "null value",
        CLUSTER_HEAD + ISSUER + "  labels:\n",
        7,
        "spec.labels",
        "expected a mapping, got null",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_rule(text: str, line: int, field: str, fragment: str) -> None:
    problem = only_problem(text)
    assert (problem.path, problem.line, problem.field) == ("m.yaml", line, field), str(problem)
    assert fragment in problem.message, str(problem)
    prefix = f"m.yaml:{line}: {field}: " if field else f"m.yaml:{line}: "
    assert str(problem) == prefix + problem.message


def test_anchors_and_aliases_refused() -> None:
    text = CLUSTER.replace("name: east", "name: &n east") + "  labels: {a: *n}\n"
    found = problems_of(text)
    assert [(p.line, p.message) for p in found] == [
        (4, "anchor '&n' is not supported; write the value out"),
        (14, "alias '*n' is not supported; write the value out"),
    ]


def test_merge_key_refused() -> None:
    text = CLUSTER_HEAD + ISSUER + "  labels:\n    <<: {a: b}\n"
    [problem] = problems_of(text)
    assert (problem.line, problem.field) == (8, "spec.labels")
    assert "merge keys" in problem.message


def test_billion_laughs_is_refused_cheaply() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    with pytest.raises(ManifestError):
        parse_text("\n".join(lines) + "\n")


def test_all_problems_collected_across_documents() -> None:
    text = (
        CLUSTER.replace("https://oidc.east.example", "http://oidc.east.example")
        + "---\n"
        + WORKLOAD.replace("namespace: payments", "namespace: Payments")
        + "  maxTokenTTL: 9h\n"
        + "---\n"
        + "kind: Nope\n"
    )
    with pytest.raises(ManifestError) as info:
        parse_text(text, "all.yaml")
    found = [(p.line, p.field) for p in info.value.problems]
    assert found == [
        (6, "spec.issuer"),
        (22, "spec.selector.namespace"),
        (24, "spec.maxTokenTTL"),
        (26, "kind"),
        (26, "apiVersion"),
        (26, "metadata"),
        (26, "spec"),
    ]
    assert str(info.value) == str(info.value.problems[0]) + " (and 6 more problems)"


def test_error_message_singular() -> None:
    error = ManifestError([Problem("a", 1, "f", "m"), Problem("a", 2, "g", "n")])
    assert str(error) == "a:1: f: m (and 1 more problem)"
    assert str(ManifestError([Problem("a", 1, "f", "m")])) == "a:1: f: m"


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text(CLUSTER)
    (tmp_path / "two.yaml").write_text(WORKLOAD + "---\n" + CLUSTER)
    with pytest.raises(ManifestError) as info:
        load_paths([str(tmp_path)])
    [problem] = info.value.problems
    assert problem.path == str(tmp_path / "two.yaml")
    assert (problem.line, problem.field) == (14, "metadata.name")
    assert f"Cluster 'east' is defined twice (first at {tmp_path / 'one.yaml'}:4)" in (
        problem.message
    )


def test_same_name_different_kind_is_fine() -> None:
    text = CLUSTER + "---\n" + WORKLOAD.replace("payments-api", "east")
    assert [d.name for d in parse_text(text)] == ["east", "east"]


def test_duplicate_in_one_text() -> None:
    [problem] = problems_of(WORKLOAD + "---\n" + WORKLOAD)
    assert (problem.line, problem.field) == (14, "metadata.name")
    assert "defined twice (first at m.yaml:4)" in problem.message


def test_unreadable_and_invalid_paths_collected(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(CLUSTER)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        CLUSTER.replace("kind: Cluster", "kind: Cluster\nspecs: {}").replace("east", "b")
    )
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"a: b\n\xff\xfe\n")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ManifestError) as info:
        load_paths([str(good), str(missing), str(bad), str(binary), str(empty_dir)])
    found = [(Path(p.path).name, p.line, p.field) for p in info.value.problems]
    assert found == [
        ("missing.yaml", 0, ""),
        ("bad.yaml", 3, "specs"),
        ("bin.yaml", 2, ""),
        ("empty", 0, ""),
    ]
    messages = [p.message for p in info.value.problems]
    assert "No such file or directory" in messages[0]
    assert "did you mean 'spec'?" in messages[1]
    assert messages[2] == "file is not valid UTF-8"
    assert "directory has no *.yaml, *.yml, *.json files" in messages[3]


def test_problem_str() -> None:
    assert str(Problem("f.yaml", 3, "spec.x", "bad")) == "f.yaml:3: spec.x: bad"
