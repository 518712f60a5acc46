"""``python -m kernelpack``: the command line (see kernelpack.cli)."""

from kernelpack.cli import main

raise SystemExit(main())
