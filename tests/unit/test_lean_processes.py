"""The controller, the router and the CLI load no torch (nor vLLM): they start in a fraction
of a second and stay small — the data plane's modules they use (layout, hashing, conversion
planning, block hashes) import torch only inside the functions that copy bytes. (import-linter cannot see the
difference between such lazy imports and module-level ones, so this is checked by running.)"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["sidecar.controller.main", "sidecar.cli",
                                    "sidecar.router.main"])
def test_importing_the_controller_the_router_or_the_cli_loads_no_torch(module):
    code = (f"import sys, {module}; "
            f"print(sorted(m for m in ('torch', 'vllm', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
