"""The benchmark scripts as modules, for the tests of the suite (a helper module, not a test module).

``benchmarks/`` is a folder of scripts, not a package: each is loaded from its path under
a name of its own, registered in ``sys.modules`` because dataclasses look their module up there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(script: str) -> ModuleType:
    """``benchmarks/<script>.py`` as the module ``kernelpack_bench_<script>`` (loaded once)."""
    name = f"kernelpack_bench_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
