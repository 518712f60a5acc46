"""The stored forms, one module each: dense, dct, series, basis, linear.

Each module owns its fields, its encoder config and its decoder; this package only
maps form names (as written in a container header) to their decoder classes.
"""

from kernelpack.forms._base import Encoded, Stored
from kernelpack.forms.basis import Basis, BasisTensor
from kernelpack.forms.dct import DCT, DCTTensor
from kernelpack.forms.dense import Dense, DenseTensor
from kernelpack.forms.linear import Linear, LinearTensor
from kernelpack.forms.series import Series, SeriesTensor

#: Decoder class by form name, as written in the header.
FORMS: dict[str, type[Encoded]] = {
    cls.form: cls for cls in (DenseTensor, DCTTensor, SeriesTensor, BasisTensor, LinearTensor)
}

#: Encoder configs a packer accepts.
Config = Dense | DCT | Series | Basis | Linear

__all__ = ["FORMS", "Config", "Encoded", "Stored", "Dense", "DCT", "Series", "Basis", "Linear",
           "DenseTensor", "DCTTensor", "SeriesTensor", "BasisTensor", "LinearTensor"]
