"""Moved into the package: ``kernelpack serve MODEL.kpk`` (module :mod:`kernelpack.serve`).

This shim keeps the old command line, ``python serving/http_service.py model.kpk [--cpu] ...``,
for scripts that still call it (``--cpu`` is ``--device cpu``), and the module's names for
``import http_service``.
"""

import sys

from kernelpack.cli import main
from kernelpack.serve import *  # noqa: F401,F403
from kernelpack.serve import Model, Service, Settings, cores, parse_json, start_service  # noqa: F401

if __name__ == "__main__":
    sys.exit(main(["serve", *("--device=cpu" if a == "--cpu" else a for a in sys.argv[1:])]))
