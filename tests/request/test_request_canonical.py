"""Canonical requests (DESIGN §3, ``request/canonical.py``) against the named vectors in
``testdata/canonical/`` (see its README), through every surface that builds a request:
``parse_request`` (``/v1/authorize``, PolicyTests) and the ext_authz check
(``agent/envoy.check_request``); plus properties of the canonical form, and control
characters refused in every field of every request shape (issue 10, finding 7)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.agent.envoy import check_request
from trustmesh.agent.kubernetes import parse_subject_access_review
from trustmesh.common.errors import RequestError, ReviewError
from trustmesh.policy.engine import Engine
from trustmesh.request import NonResourceRequest, ServiceRequest, parse_request
from trustmesh.request.canonical import canonical_path, is_short

TESTDATA = Path(__file__).parent / "testdata" / "canonical"


def cases(name: str) -> list[Any]:
    vector = json.loads((TESTDATA / name).read_text(encoding="utf-8"))
    return [pytest.param(case, id=case["name"]) for case in vector["cases"]]


def service(**fields: str) -> dict[str, str]:
    return {"host": "orders.shop.svc", "path": "/", "method": "GET", **fields}


# --- paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("paths.json"))
def test_path_vector_through_parse_request(case: dict[str, Any]) -> None:
    for field, body in (
        ("path", service(path=case["path"])),
        ("nonResourceURL", {"verb": "get", "nonResourceURL": case["path"]}),
    ):
        if "refused" in case:
            with pytest.raises(RequestError) as caught:
                parse_request(body)
            assert caught.value.description.startswith(f"request.{field} ")
            assert case["refused"] in caught.value.description
        else:
            request = parse_request(body)
            assert isinstance(request, ServiceRequest | NonResourceRequest)
            assert request.path == case["canonical"]


@pytest.mark.parametrize("case", cases("paths.json"))
def test_path_vector_through_the_ext_authz_check(case: dict[str, Any]) -> None:
    if not case["path"].startswith("/"):
        return  # an ext_authz check always has a path under /ext_authz/
    raw = b"/ext_authz" + case["path"].encode("utf-8")
    scope = {"raw_path": raw}
    if "refused" in case:
        with pytest.raises(RequestError, match=case["refused"].replace("\\", "\\\\")):
            check_request("GET", ["orders.shop.svc"], [], scope)
    else:
        assert check_request("GET", ["orders.shop.svc"], [], scope).path == case["canonical"]


# --- hosts ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("hosts.json"))
def test_host_vector(case: dict[str, Any]) -> None:
    if "refused" in case:
        with pytest.raises(RequestError) as caught:
            parse_request(service(host=case["host"]))
        assert caught.value.description.startswith("request.host ")
        assert case["refused"] in caught.value.description
        with pytest.raises(RequestError):
            check_request("GET", [case["host"]], [], {"raw_path": b"/ext_authz/"})
    else:
        request = parse_request(service(host=case["host"]))
        assert isinstance(request, ServiceRequest)
        assert request.host == case["canonical"]
        checked = check_request("GET", [case["host"]], [], {"raw_path": b"/ext_authz/"})
        assert checked.host == case["canonical"]


@pytest.mark.parametrize("case", cases("destinations.json"))
def test_destination_vector(case: dict[str, Any]) -> None:
    engine = Engine(
        {
            "cluster": "c",
            "revision": 1,
            "roles": {},
            "bindings": [],
            "clusterDomain": case["clusterDomain"],
        }
    )
    parsed = parse_request(service(host=case["host"], namespace=case["namespace"]))
    resolved = engine.resolve(parsed)
    assert isinstance(resolved, ServiceRequest)
    if case.get("ambiguous"):
        assert resolved.namespace == "" and is_short(resolved.host)
    else:
        expected = case["resolved"]
        assert (resolved.host, resolved.namespace) == (expected["host"], expected["namespace"])
        assert engine.resolve(resolved) == resolved  # once is enough


def test_the_namespace_must_be_a_namespace_name() -> None:
    for bad in ("Shop", "shop_x", "-shop", "a" * 64, "shop.svc"):
        with pytest.raises(RequestError, match=r"request\.namespace"):
            parse_request(service(namespace=bad))


# --- control characters in every field (finding 7) -------------------------------------

SHAPES = {
    "service": {"host": "orders.shop.svc", "path": "/x", "method": "GET", "namespace": "shop"},
    "kubernetes": {
        "verb": "get",
        "apiGroup": "apps",
        "resource": "deployments",
        "subresource": "scale",
        "name": "web",
        "namespace": "shop",
    },
    "nonResource": {"verb": "get", "nonResourceURL": "/healthz"},
}
CONTROLS = ("\x1b[2J", "\x00", "\n", "\x7f", "\x9b2J", "\u0085")


@pytest.mark.parametrize(
    ("shape", "field"), [(shape, field) for shape, body in SHAPES.items() for field in body]
)
def test_a_control_character_in_any_field_is_refused_naming_the_field(
    shape: str, field: str
) -> None:
    for control in CONTROLS:
        body = dict(SHAPES[shape])
        body[field] = body[field][:2] + control + body[field][2:]
        with pytest.raises(RequestError) as caught:
            parse_request(body)
        assert caught.value.description.startswith(f"request.{field} "), caught.value
        assert caught.value.status == 400


def test_a_control_character_in_a_subject_access_review_names_its_field() -> None:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": "spiffe://corp.example/x",
            "resourceAttributes": {"verb": "get", "resource": "pods\x1b[2J", "namespace": "shop"},
        },
    }
    with pytest.raises(ReviewError, match=r"spec\.resourceAttributes\.resource .*control"):
        parse_subject_access_review(review)
    review["spec"] = {"nonResourceAttributes": {"verb": "get", "path": "/debug/../pprof"}}
    with pytest.raises(ReviewError, match=r"spec\.nonResourceAttributes\.path .*dot segment"):
        parse_subject_access_review(review)


# --- properties of the canonical form ----------------------------------------------------

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
SEGMENT = st.text(alphabet=UNRESERVED + "!$&'()*+,=:@ é%", min_size=1, max_size=8)
RAW_PATHS = st.lists(SEGMENT, min_size=0, max_size=5).map(lambda s: "/" + "/".join(s))


def canonical_or_none(path: str) -> str | None:
    try:
        return canonical_path(path)
    except RequestError:
        return None


@settings(max_examples=300, deadline=None)
@given(path=RAW_PATHS)
def test_the_canonical_form_is_a_fixed_point(path: str) -> None:
    canonical = canonical_or_none(path)
    if canonical is not None:
        assert canonical_path(canonical) == canonical
        assert canonical.isascii() and " " not in canonical
        segments = canonical.split("/")[1:]
        assert all(s and s not in (".", "..") for s in segments[:-1])
        assert ";" not in canonical and "\\" not in canonical


def encode_some(draw: st.DrawFn, text: str) -> str:
    """``text`` (canonical) with some unreserved characters percent-encoded and the hex
    of existing encodings in either case."""
    out = []
    i = 0
    while i < len(text):
        if text[i] == "%":
            triplet = text[i : i + 3]
            out.append(triplet.lower() if draw(st.booleans()) else triplet)
            i += 3
            continue
        char = text[i]
        if char in UNRESERVED and draw(st.booleans()):
            code = f"{ord(char):02X}"
            out.append("%" + (code.lower() if draw(st.booleans()) else code))
        else:
            out.append(char)
        i += 1
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), path=RAW_PATHS)
def test_spellings_that_differ_in_unreserved_encodings_are_one_path(
    data: st.DataObject, path: str
) -> None:
    canonical = canonical_or_none(path)
    if canonical is None:
        return
    alias = encode_some(data.draw, canonical) + data.draw(st.sampled_from(("", "?q=1", "?")))
    assert canonical_path(alias) == canonical
