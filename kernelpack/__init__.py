"""kernelpack: compressed CNN weights in a checksummed container, decoded bit-exactly.

    import kernelpack
    kernelpack.save(model, "model.kpk", forms={"*conv*.weight": kernelpack.Series(harmonics=3)})
    state = kernelpack.load("model.kpk", device="cuda")
    with kernelpack.open("model.kpk") as c:
        w = c.get_tensor("conv1.weight")

The core import is light: numpy, msgpack; torch, scipy and zstandard load on use.
"""

from kernelpack.errors import KernelpackError
from kernelpack.forms import DCT, Basis, Dense, Linear, Series
from kernelpack.layout import VERSION as FORMAT_VERSION
from kernelpack.limits import Limits
from kernelpack.pack import save
from kernelpack.reader import Container, TensorInfo
from kernelpack.rules import Rule, Rules
from kernelpack.ort import ort_session
from kernelpack.runtime import load, load_model, load_numpy, open


def _version() -> str:
    """The installed distribution's version (pyproject.toml); a source tree not installed says so."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kernelpack")
    except PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str):
    """``kernelpack.compress_`` and ``kernelpack.plan`` load the converters on first use, and
    ``__version__`` reads the package metadata on first use: importlib.metadata costs 15 ms,
    a third of ``import kernelpack`` on the ONNX Runtime path (benchmarks/load_to_ready.py)."""
    if name == "__version__":
        globals()["__version__"] = _version()
        return globals()["__version__"]
    if name in ("compress_", "plan"):
        from kernelpack import converters

        return getattr(converters, name)
    raise AttributeError(f"module 'kernelpack' has no attribute {name!r}")


# ``open`` is kernelpack.open, never exported by ``import *`` (it would shadow the builtin).
__all__ = ["save", "Rule", "Rules", "compress_", "plan", "load", "load_numpy", "load_model", "ort_session", "Container", "TensorInfo", "Limits",
           "KernelpackError", "Dense", "DCT", "Series", "Basis", "Linear", "FORMAT_VERSION",
           "__version__"]
