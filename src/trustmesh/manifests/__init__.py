"""Kubernetes-shaped manifests: strict loading with file-and-line problems (DESIGN §3).

``parse_text``/``load_paths`` return validated :class:`Document` objects or raise one
:class:`ManifestError` listing every :class:`Problem` in the whole input.
"""

from ._anomaly import DETECTOR_FIELDS, DETECTOR_NAMES, AnomalyPolicySpec
from ._errors import ManifestError, Problem
from ._kinds import (
    API_VERSION,
    DEFAULT_MAX_STALE,
    DISCOVERY_SUFFIX,
    ClusterSpec,
    EventReceiverSpec,
    FederatedTrustDomainSpec,
    WorkloadSelector,
    WorkloadSpec,
    dns_label,
    dns_subdomain,
)
from ._load import Document, document_from_body, load_paths, parse_text
from ._policy_kinds import (
    DEFAULT_MAX_ACCESS_DURATION,
    MAX_ACCESS_DURATION,
    ClusterScope,
    Expression,
    GlobalRoleSpec,
    PolicyRule,
    PolicyTestCase,
    PolicyTestSpec,
    RoleBindingSpec,
    SubjectSpec,
    TestSubject,
    parse_rfc3339,
)
from ._templates import (
    CompiledTemplate,
    TemplateIndex,
    WorkloadTemplateSpec,
    compile_template,
    spiffe_ids_can_meet,
    template_workload_name,
    templates_overlap,
)

REGISTRY_KINDS = (
    "Cluster",
    "Workload",
    "WorkloadTemplate",
    "FederatedTrustDomain",
    "EventReceiver",
)
POLICY_KINDS = ("GlobalRole", "RoleBinding", "PolicyTest", "AnomalyPolicy")

__all__ = [
    "API_VERSION",
    "DEFAULT_MAX_ACCESS_DURATION",
    "DEFAULT_MAX_STALE",
    "DETECTOR_FIELDS",
    "DETECTOR_NAMES",
    "DISCOVERY_SUFFIX",
    "MAX_ACCESS_DURATION",
    "POLICY_KINDS",
    "REGISTRY_KINDS",
    "AnomalyPolicySpec",
    "ClusterScope",
    "ClusterSpec",
    "CompiledTemplate",
    "Document",
    "EventReceiverSpec",
    "Expression",
    "FederatedTrustDomainSpec",
    "GlobalRoleSpec",
    "ManifestError",
    "PolicyRule",
    "PolicyTestCase",
    "PolicyTestSpec",
    "Problem",
    "RoleBindingSpec",
    "SubjectSpec",
    "TemplateIndex",
    "TestSubject",
    "WorkloadSelector",
    "WorkloadSpec",
    "WorkloadTemplateSpec",
    "compile_template",
    "dns_label",
    "dns_subdomain",
    "document_from_body",
    "load_paths",
    "parse_rfc3339",
    "parse_text",
    "spiffe_ids_can_meet",
    "template_workload_name",
    "templates_overlap",
]
