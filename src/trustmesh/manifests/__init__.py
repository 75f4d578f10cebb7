"""Kubernetes-shaped manifests: strict loading with file-and-line problems (DESIGN §3).

``parse_text``/``load_paths`` return validated :class:`Document` objects or raise one
:class:`ManifestError` listing every :class:`Problem` in the whole input.
"""

from ._errors import ManifestError, Problem
from ._kinds import API_VERSION, ClusterSpec, WorkloadSelector, WorkloadSpec
from ._load import Document, document_from_body, load_paths, parse_text

__all__ = [
    "API_VERSION",
    "ClusterSpec",
    "Document",
    "ManifestError",
    "Problem",
    "WorkloadSelector",
    "WorkloadSpec",
    "document_from_body",
    "load_paths",
    "parse_text",
]
