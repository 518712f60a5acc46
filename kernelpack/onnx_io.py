"""ONNX in and out: an ONNX model's weights packed into a container, its graph attached.

``pack_onnx("model.onnx", "model.kpk")`` (the CLI's ``kernelpack pack model.onnx``):

1. **Constant nodes holding weights become initializers** named by the node's output
   (PaddlePaddle exports such as PP-OCR hold every weight in ``Constant`` nodes). A
   Constant's output read by several nodes is one tensor, hence one initializer.
2. **Weights are taken out.** A weight is a main-graph initializer (or such a Constant)
   of element type float, float16 or double with at least ``MIN_ELEMENTS`` elements and a
   valid kernelpack name (spec section 3), not itself a graph output. Everything else
   (int64 shapes, scalars such as Clip bounds, small constants, bfloat16 tensors,
   tensors inside subgraphs) stays in the graph bit for bit, and so do the opset
   imports, IR version, producer, metadata_props and every node. Each weight becomes a
   container tensor of the same name, and its initializer a reference (see
   :mod:`kernelpack.ort` and spec/FORMAT.md section 10) that keeps name, type and dims.
3. **Forms.** ``forms`` (:mod:`kernelpack.rules`, as for ``kernelpack.save``: one config, a
   mapping of exact names and patterns, ``kernelpack.Rule`` objects, or a callable) decides
   first. Without a budget every other weight is stored dense, exactly (the default:
   lossless, like every compressor). With one, the other weights read only as the weight
   of Conv/ConvTranspose (input 1: (C_out, C_in/g, kh, kw), resp. (C_in, C_out/g, kh, kw))
   or as a constant operand of Gemm/MatMul are planned by
   :func:`kernelpack.converters.planner.plan` under ``max_output_error`` (the model's output
   error measured on ``calibration`` inputs), ``max_error`` (each tensor's relative RMS
   error ||W' - W|| / ||W||) and/or ``max_bytes``; candidates are the planner's (by shape)
   plus lossless dense, so a weight-error plan always exists. MatMul weights are
   (in, out), the transpose of Gemm's transB=1 (out, in): ``dct`` does not care,
   ``linear`` then picks primary input rows rather than output filters. Every other
   weight (biases, norms, double tensors, weights holding NaN or infinity) is stored
   dense as it is: exact.

``torch_graph`` exports a PyTorch model's graph whose initializers refer to the
state_dict tensors that ``kernelpack.save(model, ...)`` writes, so a service runs the
model with ONNX Runtime without the model's Python class. ``dense_model`` rebuilds a
plain ONNX model from a container (``kernelpack unpack FILE out.onnx``).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from kernelpack.codecs import DEFAULT_LEVEL
from kernelpack.errors import KernelpackError, need_module
from kernelpack.files import atomic_write, need_output
from kernelpack.forms import Config, Dense, Encoded
from kernelpack.forms._base import need_name
from kernelpack.ort import EXTERNAL, GRAPH, LOCATION, ONNX_FLOAT_TYPES, check_graph, graph_and_weights
from kernelpack.pack import as_numpy, save, state_of
from kernelpack.rules import FormPlan, configs_for

#: Fewer elements than this: a constant of the graph (a scale, a bound), not a weight.
MIN_ELEMENTS = 16
#: (op type, input index) -> role of a constant read there; only these are planned.
WEIGHT_INPUTS = {("Conv", 1): "conv", ("ConvTranspose", 1): "conv", ("Gemm", 0): "matrix",
                 ("Gemm", 1): "matrix", ("MatMul", 0): "matrix", ("MatMul", 1): "matrix",
                 ("Conv", 2): "bias", ("ConvTranspose", 2): "bias", ("Gemm", 2): "bias",
                 **{("BatchNormalization", i): "affine" for i in (1, 2, 3, 4)}}

Keep = Callable[[Any], bool]


def _onnx() -> Any:
    return need_module("onnx", "ONNX models", "onnx")


def source_name(src: Any) -> str | None:
    """The file name of a model given by path, for error messages (None for bytes or a ModelProto)."""
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else None


def read_model(src: Any) -> Any:
    """An ``onnx.ModelProto`` from a path (external data files beside it are read), bytes, or itself."""
    onnx = _onnx()
    path = source_name(src)
    if isinstance(src, onnx.ModelProto):
        model = src
    elif path is not None and not os.path.isfile(path):
        raise KernelpackError("no such file", path=path)
    else:
        try:
            model = onnx.load(path) if path is not None else onnx.load_from_string(bytes(src))
        except Exception as exc:  # protobuf and onnx raise many types; report them as one
            raise KernelpackError(f"cannot read as ONNX: {exc}", path=path) from None
    if not model.HasField("graph") or not model.graph.node:
        raise KernelpackError("holds no ONNX graph", path=path)
    return model


# --- which tensors are weights ------------------------------------------------------------------
def _valid_name(name: str) -> bool:
    try:
        need_name(name, "name")
        return True
    except KernelpackError:
        return False


def is_weight(tensor: Any) -> bool:
    """A float/float16/double TensorProto with data, >= MIN_ELEMENTS elements, a valid name."""
    return (tensor.data_type in ONNX_FLOAT_TYPES and math.prod(tensor.dims) >= MIN_ELEMENTS
            and tensor.data_location != EXTERNAL and _valid_name(tensor.name))


def _constant_value(node: Any) -> Any:
    """The TensorProto of a Constant node given by its ``value`` attribute, else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    attributes = {a.name: a for a in node.attribute}
    return attributes["value"].t if set(attributes) == {"value"} else None


def _constants_to_initializers(graph: Any, keep: Keep) -> None:
    """Replace each Constant node whose value ``keep`` accepts by an initializer of its output name."""
    onnx = _onnx()
    outputs = {o.name for o in graph.output}
    nodes = []
    for node in graph.node:
        value = _constant_value(node)
        if value is not None and node.output[0] not in outputs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            if keep(tensor):
                graph.initializer.append(tensor)
                continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _make_reference(tensor: Any) -> None:
    """Drop a TensorProto's data; keep name, type, dims and doc; point it at the container."""
    onnx = _onnx()
    ref = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                           doc_string=tensor.doc_string, data_location=EXTERNAL)
    ref.external_data.add(key="location", value=LOCATION)
    tensor.CopyFrom(ref)


def tensor_array(tensor: Any) -> np.ndarray:
    """A TensorProto's data as numpy; data that does not fit its dims is a KernelpackError."""
    try:
        return _onnx().numpy_helper.to_array(tensor)
    except Exception as exc:  # numpy_helper raises ValueError, TypeError, ...: report them as one
        raise KernelpackError(f"the initializer's data does not fit its dims {list(tensor.dims)} "
                              f"(element type {tensor.data_type}): {exc}", tensor=tensor.name, field="dims") from None


def take_out(model: Any, keep: Keep = is_weight, constants: bool = True) -> tuple[Any, dict[str, np.ndarray]]:
    """A copy of ``model`` whose weights (initializers ``keep`` accepts; with ``constants``, also
    weight Constant nodes) are references, and those weights as numpy arrays, in graph order."""
    onnx = _onnx()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if constants:
        _constants_to_initializers(out.graph, keep)
    outputs = {o.name for o in out.graph.output}
    weights = {}
    for tensor in out.graph.initializer:
        if tensor.name not in outputs and keep(tensor):
            weights[tensor.name] = tensor_array(tensor)
            _make_reference(tensor)
    return out, weights


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    onnx = _onnx()
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _nodes(sub)


def weight_roles(graph: Any) -> dict[str, str]:
    """Value name -> 'conv', 'matrix', 'bias' (a Conv/ConvTranspose/Gemm bias) or 'affine' (a
    BatchNormalization scale, bias, mean or variance) for values read only at inputs of that role."""
    uses: dict[str, set[str | None]] = {o.name: {None} for o in graph.output}
    for node in _nodes(graph):
        standard = node.domain in ("", "ai.onnx")
        for index, name in enumerate(node.input):
            uses.setdefault(name, set()).add(WEIGHT_INPUTS.get((node.op_type, index)) if standard else None)
    return {name: next(iter(roles)) for name, roles in uses.items() if len(roles) == 1 and None not in roles}


# --- forms ---------------------------------------------------------------------------------
def weight_configs(model: Any, weights: Mapping[str, np.ndarray], forms: FormPlan = None,
                   candidates: Any = None, **budget: Any) -> dict[str, Config]:
    """A form per weight: ``forms`` first, then the budget plan (``plan``'s max_output_error,
    max_error, max_bytes, calibration, metric, progress) for conv/matrix weights, else dense.
    A weight holding NaN or infinity is not planned (its relative error means nothing): dense,
    exact. Without a budget (max_error 0 counts as none: exact) nothing is planned."""
    from kernelpack.converters.planner import default_candidates, plan

    planned: Mapping[str, Config] = {}
    if budget.get("max_error") or budget.get("max_bytes") is not None or budget.get("max_output_error") is not None:
        budget["max_error"] = budget.get("max_error") or None
        lossless = candidates and (lambda name, shape: [*_listed(candidates, name, shape), Dense()])
        planned = plan(model, forms=forms, candidates=lossless or default_candidates, **budget)
    return _with_hessians(configs_for(forms, weights, planned), forms, planned)


class _Configs(dict):
    """Configs by weight name, carrying the calibration statistics of a calibrated plan's
    output-aware choices (``Plan.hessians``) on to ``save``, so that the file holds the
    tensors the plan measured."""

    hessians: dict[str, Any]


def _with_hessians(configs: dict[str, Config], *plans: Any) -> dict[str, Config]:
    """``configs`` with the statistics of every calibrated plan among ``plans`` for the tensors
    whose config came from that plan."""
    out = _Configs(configs)
    out.hessians = {n: h for p in plans if isinstance(p, Mapping) for n, h in getattr(p, "hessians", {}).items()
                    if n in configs and configs[n] is p.get(n)}
    return out


def _listed(candidates: Any, name: str, shape: tuple[int, ...]) -> list[Config]:
    return list(candidates(name, shape) if callable(candidates) else candidates)


def pack_onnx(src: Any, path: str | os.PathLike, forms: FormPlan = None, *,
              max_error: float | None = None, max_bytes: int | None = None,
              max_output_error: float | None = None, calibration: Any = None, metric: Any = None,
              candidates: Any = None, metadata: Mapping[str, str] | None = None,
              level: int = DEFAULT_LEVEL, progress: bool | None = None) -> dict[str, Encoded]:
    """Pack an ONNX model (path, bytes or ModelProto): weights as tensors, the rest as ``onnx.graph``.

    See the module doc for what counts as a weight and which form it gets; without a
    budget (``max_output_error``, ``max_error`` > 0 or ``max_bytes``) every weight ``forms``
    does not name is stored dense, exactly. Returns the encoded tensors (what was written).
    """
    model = read_model(src)
    try:
        graph, weights = take_out(model)
    except KernelpackError as exc:
        raise exc.located(path=source_name(src)) from None
    attached = graph.SerializeToString()
    checked(attached, weights, source_name(src))
    configs = weight_configs(model, weights, forms, candidates, max_error=max_error, max_bytes=max_bytes,
                             max_output_error=max_output_error, calibration=calibration, metric=metric,
                             progress=progress)
    return save(weights, path, forms=configs, metadata=metadata, level=level, attachments={GRAPH: attached})


def checked(graph: bytes, weights: Mapping[str, np.ndarray], source: str | None) -> None:
    """Refuse to write a graph that readers would refuse (:func:`kernelpack.ort.check_graph`): a
    source tensor with external data the packer did not read (a model given as bytes, or data
    outside the graph's own tensors), or a reference to a tensor the packer did not take out."""
    for ref in check_graph(graph, source):  # fields name the place in the attachment to be written
        if ref.name not in weights:
            raise KernelpackError(f"refers to external data {LOCATION!r}, which is not a file this packer "
                                  "reads", path=source, tensor=ref.name,
                                  field=f"attachments.{GRAPH}.{ref.where}.external_data")


# --- PyTorch in ---------------------------------------------------------------------------
def torch_graph(model: Any, args: Any, **export: Any) -> bytes:
    """The ONNX graph of a PyTorch model, for ``kernelpack.save(model, path,
    attachments={"onnx.graph": torch_graph(model, x)})``.

    Exported by torch's TorchScript exporter (``dynamo=False``: the dynamo exporter needs
    onnxscript) in eval mode without constant folding, so parameters stay initializers
    under their state_dict names. Every float initializer equal bit for bit to the
    state_dict tensor of its name becomes a reference to it (however small: the ORT and
    torch runtimes then read the very same decoded tensor); the rest stays in the graph.
    ``export`` goes to ``torch.onnx.export`` (input_names, output_names, dynamic_axes,
    opset_version). Note the exporter merges equal tensors (e.g. a fresh BatchNorm's
    running_var and weight, both ones): the graph then reads one of them for both.
    """
    import torch

    onnx = _onnx()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(model, args, buffer, dynamo=False, export_params=True, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, keep_initializers_as_inputs=False, **export)
    state = {name: as_numpy(value)[0] for name, value in state_of(model).items()
             if not isinstance(value, Encoded)}

    def in_state(tensor: Any) -> bool:
        if tensor.name not in state or tensor.data_type not in ONNX_FLOAT_TYPES:
            return False
        value = tensor_array(tensor)
        return value.dtype == state[tensor.name].dtype and np.array_equal(value, state[tensor.name])

    graph, _ = take_out(onnx.load_from_string(buffer.getvalue()), in_state, constants=False)
    return graph.SerializeToString()


# --- ONNX out -----------------------------------------------------------------------------
def dense_model(path: str | os.PathLike) -> Any:
    """The container's model as a plain ONNX ModelProto: every reference filled with its decoded
    tensor (numpy, the initializer's type). Weights that were Constant nodes stay initializers."""
    onnx = _onnx()
    graph, weights = graph_and_weights(path)
    try:
        model = onnx.load_from_string(graph)
    except Exception as exc:  # protobuf's DecodeError on what the wire check does not read
        raise KernelpackError(f"not a valid ONNX ModelProto: {exc}", path=os.fspath(path),
                              field=f"attachments.{GRAPH}") from None
    for tensor in model.graph.initializer:
        if tensor.name in weights and tensor.data_location == EXTERNAL:
            filled = onnx.numpy_helper.from_array(weights[tensor.name], tensor.name)
            filled.doc_string = tensor.doc_string
            tensor.CopyFrom(filled)
    return model


def unpack_onnx(path: str | os.PathLike, output: str | os.PathLike) -> Any:
    """Write :func:`dense_model` to ``output`` atomically, as every kernelpack write (spec section 5,
    "Writing": a failed write leaves ``output`` as it was); returns the model."""
    output = need_output(output)
    model = dense_model(path)
    try:
        data = model.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GiB message limit
        raise KernelpackError(f"cannot write the ONNX model: {exc}", path=output) from None
    atomic_write(output, [data])
    return model
