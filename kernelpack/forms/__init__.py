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

#: Encoder config class by form name (for configs written as JSON or on the command line).
CONFIGS: dict[str, type] = {"dense": Dense, "dct": DCT, "series": Series, "basis": Basis,
                            "linear": Linear}


def config_from_dict(spec: dict) -> Config:
    """``{"form": "series", "harmonics": [3, 3]}`` -> ``Series(harmonics=(3, 3))``."""
    from kernelpack.errors import KernelpackError

    settings = dict(spec)
    name = settings.pop("form", None)
    if name not in CONFIGS:
        raise KernelpackError(f"unknown form {name!r}; known: {sorted(CONFIGS)}", field="form")
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    try:
        return CONFIGS[name](**settings)
    except TypeError as exc:
        raise KernelpackError(f"bad settings for form {name!r}: {exc}", field="form") from None


__all__ = ["CONFIGS", "config_from_dict", "FORMS", "Config", "Encoded", "Stored", "Dense", "DCT", "Series", "Basis", "Linear",
           "DenseTensor", "DCTTensor", "SeriesTensor", "BasisTensor", "LinearTensor"]
