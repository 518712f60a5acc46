"""kernelpack: compressed CNN weights in a checksummed container, decoded bit-exactly.

    import kernelpack
    kernelpack.save(model, "model.kpk", forms={"*conv*.weight": kernelpack.Series(harmonics=3)})
    state = kernelpack.load("model.kpk", device="cuda")
    with kernelpack.open("model.kpk") as c:
        w = c.get_tensor("conv1.weight")

The core import is light: numpy, msgpack; torch, scipy and zstandard load on use.
"""

from kernelpack.container import VERSION as FORMAT_VERSION
from kernelpack.container import Container, Limits, TensorInfo
from kernelpack.errors import KernelpackError
from kernelpack.forms import DCT, Basis, Dense, Linear, Series
from kernelpack.pack import save
from kernelpack.runtime import load, load_model, load_numpy, open, ort_session

__version__ = "0.1.0"

def __getattr__(name: str):
    """``kernelpack.compress_`` and ``kernelpack.plan`` load the converters on first use."""
    if name in ("compress_", "plan"):
        from kernelpack import converters

        return getattr(converters, name)
    raise AttributeError(f"module 'kernelpack' has no attribute {name!r}")


__all__ = ["save", "compress_", "plan", "load", "load_numpy", "load_model", "open", "ort_session", "Container", "TensorInfo", "Limits",
           "KernelpackError", "Dense", "DCT", "Series", "Basis", "Linear", "FORMAT_VERSION",
           "__version__"]
