"""Packing: tensors or a model in, a container out (``kernelpack.save``).

Forms are chosen per tensor by rules (:mod:`kernelpack.rules`: exact tensor name, then exact
module name, then the first matching pattern, then the default), e.g.
``{"*.conv*.weight": Series(harmonics=3), "fc*.weight": DCT(keep=0.05)}``; tensors
that no rule chooses are stored dense. A tensor already in a stored form (from
the converters' training-time parametrisations) is packed as it is, no re-fit.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Collection, Mapping

import numpy as np

from kernelpack._backend import NUMPY_DTYPES, bfloat16_bits_to_float32
from kernelpack.codecs import DEFAULT_CODECS, DEFAULT_LEVEL
from kernelpack.errors import KernelpackError
from kernelpack.files import need_output
from kernelpack.forms import Config, Dense, Encoded
from kernelpack.forms._base import ELEMENT_WORK, Cost, need, shown
from kernelpack.rules import FormPlan, configs_for
from kernelpack.writer import write

SUPPORTED_DTYPES = frozenset(NUMPY_DTYPES)


def as_numpy(value: Any) -> tuple[np.ndarray, str]:
    """A torch tensor or array-like as (numpy array, spec dtype name); bfloat16 as raw bits."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        t = value.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in SUPPORTED_DTYPES:
            raise KernelpackError(f"unsupported dtype {t.dtype}", field="dtype")
        if name == "bfloat16":
            import torch

            return t.view(torch.uint16).numpy(), "bfloat16"
        return t.numpy(), name
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged lists, objects whose __array__ fails
        raise KernelpackError(f"is not an array: {shown(value)}: {exc}", field="values") from None
    name = array.dtype.name
    if name not in SUPPORTED_DTYPES:
        raise KernelpackError(f"unsupported dtype {array.dtype}", field="dtype")
    return array, name


def encode(name: str, value: Any, config: Config, hessian: Any = None) -> Encoded:
    """One tensor in the form ``config`` asks for (fitted output-aware under ``hessian``, the
    calibration statistics of its layer, when given); errors name the tensor."""
    if isinstance(value, Encoded):
        return value
    try:
        array, dtype = as_numpy(value)
        if not isinstance(config, Dense):
            need(dtype in ("float16", "bfloat16", "float32", "float64"), "dtype",
                 f"form {type(config).__name__} needs a floating tensor, got {dtype}")
            if dtype == "bfloat16":
                array = bfloat16_bits_to_float32(array)
        try:
            return config.encode(array, dtype) if hessian is None else config.encode(array, dtype, hessian=hessian)
        except KernelpackError:
            raise
        except (TypeError, ValueError) as exc:  # a setting of the wrong type or value
            raise KernelpackError(f"bad settings {config!r}: {exc}", field="settings") from None
    except KernelpackError as exc:
        raise exc.located(tensor=name) from None


def encode_all(state: Mapping[str, Any], configs: Mapping[str, Config],
               hessians: Mapping[str, Any]) -> dict[str, Encoded]:
    """Every tensor of ``state`` by :func:`encode`, in order, the larger ones on a thread per
    core and numpy's BLAS on one thread meanwhile (kernelpack._parallel, as loads and the
    planner run theirs). Why one BLAS thread even where the fits run one after the other: a
    fit's many small factorisations on BLAS's threads stall whenever another process keeps a
    core busy (a 128 x 128 Cholesky: 120 ms on two OpenBLAS threads beside one busy process,
    0.1 ms on one). The encoded tensors do not depend on the thread count; a failure is the
    first failing tensor's, as in a loop."""
    from kernelpack._parallel import map_in_order, one_blas_thread

    def one(name: str) -> Encoded:
        return encode(name, state[name], configs[name], hessians.get(name))

    with one_blas_thread():
        return map_in_order(one, list(state), None, lambda name: _encode_cost(state[name]))


def _encode_cost(value: Any) -> Cost:
    """What map_in_order schedules an encode by: the work of reading its elements (a tensor
    already encoded costs nothing)."""
    size = 0 if isinstance(value, Encoded) else math.prod(getattr(value, "shape", np.shape(value)))
    return Cost(size, 0, ELEMENT_WORK * size)


def state_of(obj: Any) -> Mapping[str, Any]:
    """A model's state_dict (trained-in-place forms as they are, no re-fit), or the mapping itself."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict) and hasattr(obj, "named_modules"):
        # A module can hold kernelpack's parametrisations only once their base class is
        # loaded; until then the state_dict is the state. Looked up, not imported: the
        # converters build on pack, never the other way round.
        common = sys.modules.get("kernelpack.converters._common")
        return obj.state_dict() if common is None else common.encoded_state(obj)
    if isinstance(obj, Mapping):
        return obj
    raise KernelpackError(f"takes an nn.Module or a mapping of names to tensors, got "
                          f"{type(obj).__name__}", field="model")


def save(obj: Any, path: str | os.PathLike, forms: FormPlan = None,
         metadata: Mapping[str, str] | None = None, level: int = DEFAULT_LEVEL,
         attachments: Mapping[str, bytes] | None = None, codecs: Collection[str] = DEFAULT_CODECS,
         compact: bool = True) -> dict[str, Encoded]:
    """Pack a model (its state_dict) or a dict of tensors into a container at ``path``.

    Lossless unless ``forms`` asks for loss: a tensor no rule chooses is stored as it is.
    The write is atomic (a temporary file renamed into place); ``path`` is checked before
    any tensor is encoded.

    Args:
        obj: an ``nn.Module`` (its state_dict; weights that ``compress_`` put in a form are
            stored as the fields they trained, no re-fit) or a mapping of names to torch
            tensors or numpy arrays.
        path: the file to write.
        forms: which tensor gets which form (:mod:`kernelpack.rules`: one config, a mapping
            of names and patterns to configs, a list of ``kernelpack.Rule``, or a function
            ``(name, value) -> config``); a rule that chooses no tensor is a UserWarning. A
            calibrated ``kernelpack.plan`` fits its tensors under the plan's calibration
            statistics (``Plan.hessians``), exactly as the plan measured them.
        metadata: str to str, stored in the header (``Container.metadata()``).
        level: zstd's level, 1..22 (default 19: on real models 0.4-5.8% smaller files than
            level 3, which is up to 30 times faster).
        attachments: named byte strings stored alongside (e.g. ``onnx.graph``).
        codecs: each payload takes the smallest of these; ``kernelpack.codecs.codecs_of(1)`` leaves out
            ``zstd-shuffle`` (format 1.2) so that a file without quantised numbers stays
            readable by 1.1 readers.
        compact: the header zstd-compressed against the header dictionary, compressed
            payloads unaligned and runs of small payloads under one SHA-256 (formats 1.4,
            1.6), where that saves bytes; False writes for readers before 1.4.

    Returns:
        The encoded tensors by name (what was written).

    Raises:
        KernelpackError: naming the file, tensor and field, for a bad input or setting
            (nothing is written then).

    Example:
        >>> import numpy as np, kernelpack
        >>> from kernelpack import Dense, Rule
        >>> weights = {"conv.weight": np.ones((8, 3, 3, 3), np.float32), "conv.bias": np.zeros(8, np.float32)}
        >>> encoded = kernelpack.save(weights, "model.kpk", forms=[Rule("*", Dense(dtype="float16"), min_rank=2)])
        >>> encoded["conv.weight"].arrays()["data"].dtype, encoded["conv.bias"].arrays()["data"].dtype
        ('float16', 'float32')
    """
    need_output(path)
    hessians = getattr(forms, "hessians", None) or {}  # a calibrated Plan's statistics
    try:
        state = state_of(obj)
        encoded = encode_all(state, configs_for(forms, state), hessians)
        write(path, encoded, metadata, level, attachments, codecs, compact)
    except KernelpackError as exc:  # a refusal names the file it was writing
        raise exc.located(path=os.fspath(path)) from None
    return encoded
