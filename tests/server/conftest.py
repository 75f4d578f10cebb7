"""The replica tests start ``trustmesh sidecar`` processes as the sidecar tests do: their
support module is shared, not copied."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sidecar"))
