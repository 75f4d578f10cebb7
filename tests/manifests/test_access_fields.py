"""Issue 14 item 5: GlobalRole maxAccessDuration, RoleBinding expiresAt, user subjects
(RoleBinding and PolicyTest), each refused with its file line and field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from manifest_samples import only_problem

from trustmesh.manifests import (
    DEFAULT_MAX_ACCESS_DURATION,
    GlobalRoleSpec,
    PolicyTestSpec,
    RoleBindingSpec,
    parse_text,
)

HEAD = "apiVersion: trustmesh.io/v1alpha1\nkind: {kind}\nmetadata:\n  name: x\nspec:\n"
ROLE = HEAD.format(kind="GlobalRole") + "  rules: []\n"  # line 6
BINDING = HEAD.format(kind="RoleBinding") + "  role: r\n"  # line 6
TEST = HEAD.format(kind="PolicyTest") + "  cases:\n"  # line 6
K8S = "{verb: get, apiGroup: '', resource: pods, namespace: ns}"


def test_max_access_duration_default_and_syntax() -> None:
    (doc,) = parse_text(ROLE)
    assert isinstance(doc.spec, GlobalRoleSpec)
    assert doc.spec.max_access_duration == DEFAULT_MAX_ACCESS_DURATION == 8 * 3600
    assert "maxAccessDuration" not in doc.body["spec"]  # stored roles keep their hash
    for text, seconds in (("30m", 1800), ("8h", 28800), ("2d", 172800), ("30d", 2592000)):
        (doc,) = parse_text(ROLE + f"  maxAccessDuration: {text}\n")
        assert isinstance(doc.spec, GlobalRoleSpec)
        assert doc.spec.max_access_duration == seconds


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0", "must be between 1 and 2592000 seconds, got 0"),
        ("0s", "must be between 1 and 2592000 seconds, got 0"),
        ("-5", "must be between 1 and 2592000 seconds, got -5"),
        ("-5m", "'-5m' is not an integer number of seconds or a duration"),
        ("31d", "must be between 1 and 2592000 seconds, got 2678400"),
        ("soon", "'soon' is not an integer number of seconds or a duration"),
    ],
)
def test_max_access_duration_refused(value: str, fragment: str) -> None:
    problem = only_problem(ROLE + f"  maxAccessDuration: {value}\n")
    assert (problem.line, problem.field) == (7, "spec.maxAccessDuration")
    assert fragment in problem.message


@pytest.mark.parametrize(
    "written",
    ["2026-12-01T03:00:00Z", "'2026-12-01T03:00:00Z'", "'2026-12-01T04:00:00+01:00'"],
)
def test_expires_at_kept_as_written(written: str) -> None:
    (doc,) = parse_text(BINDING + f"  expiresAt: {written}\n  subjects: [{{user: ann}}]\n")
    assert isinstance(doc.spec, RoleBindingSpec)
    instant = datetime(2026, 12, 1, 3, 0, tzinfo=UTC).timestamp()
    assert doc.spec.expires_at == instant
    assert doc.body["spec"]["expiresAt"] == written.strip("'")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("'2026-12-01T03:00:00'", "is not an RFC 3339 timestamp with a time zone"),
        ("'2026-12-01'", "is not an RFC 3339 timestamp with a time zone"),
        ("'tomorrow'", "is not an RFC 3339 timestamp with a time zone"),
        ("'2026-02-30T03:00:00Z'", "is not a valid date and time"),
        ("1796094000", "expected an RFC 3339 timestamp"),
    ],
)
def test_expires_at_refused(value: str, fragment: str) -> None:
    problem = only_problem(BINDING + f"  expiresAt: {value}\n  subjects: [{{user: ann}}]\n")
    assert (problem.line, problem.field) == (7, "spec.expiresAt")
    assert fragment in problem.message


def test_user_subject() -> None:
    (doc,) = parse_text(BINDING + "  subjects:\n  - user: ann.lee\n")
    assert isinstance(doc.spec, RoleBindingSpec)
    assert doc.spec.subjects[0].user == "ann.lee"
    assert doc.spec.subjects[0].workload is None


@pytest.mark.parametrize("other", ["workload: w", "spiffeId: spiffe://td/x", "claims: {a: b}"])
def test_user_subject_alone(other: str) -> None:
    problem = only_problem(BINDING + f"  subjects:\n  - user: ann\n    {other}\n")
    field = other.split(":")[0]
    assert (problem.line, problem.field) == (9, f"spec.subjects[0].{field}")
    assert f"'user' and '{field}' are mutually exclusive" in problem.message


def test_user_subject_with_expressions() -> None:
    problem = only_problem(
        BINDING + "  subjects:\n  - user: ann\n    matchExpressions: [{key: a, operator: Exists}]\n"
    )
    assert problem.field == "spec.subjects[0].matchExpressions"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("Ann", "'Ann' is not a valid person name"),
        ("'user:ann'", "without the user: prefix"),
        ("ann-", "'ann-' is not a valid person name"),
        ("'1ann'", "'1ann' is not a valid person name"),
    ],
)
def test_user_subject_bad_name(name: str, fragment: str) -> None:
    problem = only_problem(BINDING + f"  subjects:\n  - user: {name}\n")
    assert (problem.line, problem.field) == (8, "spec.subjects[0].user")
    assert fragment in problem.message


def test_policy_test_user_subject() -> None:
    (doc,) = parse_text(
        TEST
        + f"  - subject: {{user: ann}}\n    cluster: c\n    request: {K8S}\n    expect: allow\n"
    )
    assert isinstance(doc.spec, PolicyTestSpec)
    assert doc.spec.cases[0].subject.user == "ann"


def test_policy_test_user_asks_kubernetes_only() -> None:
    problem = only_problem(
        TEST + "  - subject: {user: ann}\n    cluster: c\n"
        "    request: {host: api.shop.svc, path: /, method: GET}\n    expect: allow\n"
    )
    assert (problem.line, problem.field) == (9, "spec.cases[0].request")
    assert "Kubernetes request" in problem.message


def test_policy_test_user_alone() -> None:
    problem = only_problem(
        TEST + f"  - subject: {{user: ann, workload: w}}\n    cluster: c\n"
        f"    request: {K8S}\n    expect: allow\n"
    )
    assert problem.field == "spec.cases[0].subject.workload"
    assert "'user' and 'workload' are mutually exclusive" in problem.message
