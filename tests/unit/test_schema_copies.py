"""The schemas the tests validate against are kept in the repository (tests/schemas) so a
clean clone, with no ../shared beside it, tests exactly what a developer's checkout tests.
They must stay verbatim copies of what was published."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from tests.openai_schema import SCHEMAS

SHARED = Path(__file__).resolve().parents[3] / "shared" / "schemas"
COPIES = sorted(p.relative_to(SCHEMAS) for p in SCHEMAS.rglob("*") if p.is_file())


def test_the_kuberay_crds_are_the_release_files_their_readme_names():
    readme = (SCHEMAS / "kuberay" / "README.md").read_text()
    for kind in ("rayservices", "rayclusters"):
        published = re.search(rf"{kind} `([0-9a-f]{{64}})`", readme).group(1)
        data = (SCHEMAS / "kuberay" / f"ray.io_{kind}.yaml").read_bytes()
        assert hashlib.sha256(data).hexdigest() == published, kind


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/schemas beside this checkout (a clean clone)")
def test_the_copies_match_the_shared_schemas_byte_for_byte():
    shared = sorted(p.relative_to(SHARED) for p in SHARED.rglob("*") if p.is_file())
    assert shared == COPIES
    for name in COPIES:
        assert (SCHEMAS / name).read_bytes() == (SHARED / name).read_bytes(), name
