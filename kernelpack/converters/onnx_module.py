"""``from_onnx``: an ONNX model as a trainable torch module, so that ``compress_`` and ``distill``
reach models that exist only as ONNX files, and ``OnnxModule.save`` packs the result back.

The module runs the graph's nodes in order with torch operations (autograd flows through
every one). Its **parameters are the graph's weights** as :func:`kernelpack.onnx_io.take_out`
finds them (weight Constant nodes included), each at the path of its ONNX name, dots being
submodules: ONNX weight ``fc_0.w_0`` is parameter ``fc_0.w_0``, so a plan of the ONNX model
(``kernelpack.plan(onnx_model, ...)``, keyed by ONNX names) is a ``compress_`` config of the
module as it is. Every other constant (shapes, Clip bounds, small tensors) is a
non-persistent buffer: the ``state_dict`` holds the weights alone.

Decisions, written down here because ONNX leaves them to the runtime:

* BatchNormalization is always the inference formula, ``(x - mean) / sqrt(var + eps) *
  scale + bias`` with the stored statistics, in train mode too: distillation fine-tunes
  scale and bias instead of re-estimating statistics from small batches. Mean and var are
  parameters that do not train (``requires_grad`` False): with them fixed, scale and bias
  still reach every affine map of the channel, and a trained variance could turn negative,
  which no runtime's square root survives.
* ``logits=True`` returns, for a graph output made by Softmax (through Identity nodes), the
  Softmax's input: the same argmax, and the form :func:`distill`'s KL loss wants. The graph
  that ``save`` writes keeps its Softmax.
* Only the operators the module knows run (:data:`OPS`: what CNN exports such as PP-OCR's
  use); any other is refused at construction, naming the node. Results equal ONNX
  Runtime's to float32 rounding, not bit for bit (ops sum in a different order); the
  packed file's decode is the exact one.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kernelpack.codecs import DEFAULT_LEVEL
from kernelpack.errors import KernelpackError
from kernelpack.onnx_io import GRAPH, _onnx, checked, read_model, source_name, take_out, tensor_array
from kernelpack.pack import FormPlan, save

#: ONNX element types as torch dtypes (Cast's ``to`` and constants).
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}

Op = Callable[[list[Any], dict[str, Any], int], Any]


def _pads(pads: Sequence[int], rank: int) -> tuple[list[int], list[int] | None]:
    """ONNX pads (begins then ends) as a symmetric padding, or zero padding plus the F.pad
    list (last dim first) when begins and ends differ."""
    pads = list(pads) or [0] * (2 * rank)
    begin, end = pads[:rank], pads[rank:]
    if begin == end:
        return begin, None
    return [0] * rank, [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]


def _conv(x: list[Any], a: dict[str, Any], _opset: int) -> torch.Tensor:
    data, weight, bias = x[0], x[1], x[2] if len(x) > 2 else None
    rank = weight.ndim - 2
    _auto_pad(a)
    padding, extra = _pads(a.get("pads", []), rank)
    if extra is not None:
        data = F.pad(data, extra)
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return conv(data, weight, bias, stride=a.get("strides", [1] * rank), padding=padding,
                dilation=a.get("dilations", [1] * rank), groups=a.get("group", 1))


def _conv_transpose(x: list[Any], a: dict[str, Any], _opset: int) -> torch.Tensor:
    data, weight, bias = x[0], x[1], x[2] if len(x) > 2 else None
    rank = weight.ndim - 2
    _auto_pad(a)
    if "output_shape" in a:
        raise KernelpackError("ConvTranspose's output_shape is not supported", field="output_shape")
    padding, extra = _pads(a.get("pads", []), rank)
    if extra is not None:
        raise KernelpackError("ConvTranspose with unequal begin and end pads is not supported", field="pads")
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    return conv(data, weight, bias, stride=a.get("strides", [1] * rank), padding=padding,
                output_padding=a.get("output_padding", [0] * rank), groups=a.get("group", 1),
                dilation=a.get("dilations", [1] * rank))


def _auto_pad(a: dict[str, Any]) -> None:
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise KernelpackError(f"auto_pad {a['auto_pad']!r} is not supported (only explicit pads)", field="auto_pad")


def _batch_norm(x: list[Any], a: dict[str, Any], _opset: int) -> torch.Tensor:
    data, scale, bias, mean, var = x[:5]
    shape = [1, -1] + [1] * (data.ndim - 2)
    eps = a.get("epsilon", 1e-5)
    return (data - mean.reshape(shape)) * (scale / torch.sqrt(var + eps)).reshape(shape) + bias.reshape(shape)


def _pool(kind: str) -> Op:
    def pool(x: list[Any], a: dict[str, Any], _opset: int) -> torch.Tensor:
        data = x[0]
        rank = data.ndim - 2
        _auto_pad(a)
        kernel = a["kernel_shape"]
        padding, extra = _pads(a.get("pads", []), rank)
        if extra is not None or any(p > k // 2 for p, k in zip(padding, kernel)):
            raise KernelpackError(f"{kind} with these pads is not supported", field="pads")
        strides, ceil = a.get("strides", [1] * rank), bool(a.get("ceil_mode", 0))
        if kind == "MaxPool":
            return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1](
                data, kernel, strides, padding, a.get("dilations", [1] * rank), ceil_mode=ceil)
        return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1](
            data, kernel, strides, padding, ceil_mode=ceil, count_include_pad=bool(a.get("count_include_pad", 0)))
    return pool


def _softmax(x: list[Any], a: dict[str, Any], opset: int) -> torch.Tensor:
    data = x[0]
    if opset >= 13:
        return torch.softmax(data, dim=a.get("axis", -1))
    axis = a.get("axis", 1) % max(data.ndim, 1)  # before opset 13: softmax of the 2-D flattening at axis
    flat = data.reshape(math.prod(data.shape[:axis]), -1)
    return torch.softmax(flat, dim=1).reshape(data.shape)


def _reshape(x: list[Any], a: dict[str, Any], _opset: int) -> torch.Tensor:
    data, shape = x[0], [int(s) for s in x[1].tolist()]
    if not a.get("allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _shape(x: list[Any], a: dict[str, Any], _opset: int) -> torch.Tensor:
    dims = list(x[0].shape)[a.get("start", 0):a.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x[0].device)


def _slice(x: list[Any], _a: dict[str, Any], _opset: int) -> torch.Tensor:
    data, starts, ends = x[0], x[1].tolist(), x[2].tolist()
    axes = x[3].tolist() if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = x[4].tolist() if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            raise KernelpackError(f"Slice with step {step} is not supported", field="steps")
        index[axis % data.ndim] = slice(start, end, step)
    return data[tuple(index)]


def _reduce_mean(x: list[Any], a: dict[str, Any], opset: int) -> torch.Tensor:
    axes = x[1].tolist() if opset >= 18 and len(x) > 1 and x[1] is not None else a.get("axes")
    keep = bool(a.get("keepdims", 1))
    return x[0].mean(dim=axes, keepdim=keep) if axes else x[0].mean(dim=list(range(x[0].ndim)), keepdim=keep)


def _squeeze(x: list[Any], a: dict[str, Any], opset: int) -> torch.Tensor:
    axes = x[1].tolist() if opset >= 13 and len(x) > 1 and x[1] is not None else a.get("axes")
    if axes is None:
        return x[0].squeeze()
    return x[0].squeeze(tuple(axes))


def _unsqueeze(x: list[Any], a: dict[str, Any], opset: int) -> torch.Tensor:
    axes = x[1].tolist() if opset >= 13 else a["axes"]
    out, rank = x[0], x[0].ndim + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        out = out.unsqueeze(axis)
    return out


def _resize(x: list[Any], a: dict[str, Any], opset: int) -> torch.Tensor:
    data = x[0]
    scales = x[2] if opset >= 11 and len(x) > 2 else x[1] if opset < 11 else None
    sizes = x[3] if len(x) > 3 else None
    mode, transform = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
    if mode == "nearest" and transform == "asymmetric" and a.get("nearest_mode", "round_prefer_floor") == "floor":
        options: dict[str, Any] = {"mode": "nearest"}
    elif mode == "linear" and data.ndim == 4 and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        options = {"mode": "bilinear", "align_corners": transform == "align_corners"}
    else:
        raise KernelpackError(f"Resize mode {mode!r} with coordinate_transformation_mode {transform!r} and "
                              f"nearest_mode {a.get('nearest_mode')!r} is not supported", field="mode")
    if sizes is not None and sizes.numel():
        return F.interpolate(data, size=[int(s) for s in sizes.tolist()[2:]], **options)
    factors = [float(s) for s in scales.tolist()]
    if factors[:2] != [1.0, 1.0]:
        raise KernelpackError(f"Resize scales {factors} change batch or channels", field="scales")
    return F.interpolate(data, scale_factor=factors[2:], **options)


def _clip(x: list[Any], a: dict[str, Any], opset: int) -> torch.Tensor:
    low, high = (x[1] if len(x) > 1 else None, x[2] if len(x) > 2 else None) if opset >= 11 \
        else (a.get("min"), a.get("max"))
    return torch.clamp(x[0], low, high)


def _gemm(x: list[Any], a: dict[str, Any], _opset: int) -> torch.Tensor:
    left = x[0].t() if a.get("transA", 0) else x[0]
    right = x[1].t() if a.get("transB", 0) else x[1]
    out = a.get("alpha", 1.0) * (left @ right)
    return out + a.get("beta", 1.0) * x[2] if len(x) > 2 and x[2] is not None else out


def _hard_sigmoid(x: list[Any], a: dict[str, Any], _opset: int) -> torch.Tensor:
    return torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0.0, 1.0)


def _elementwise(fn: Callable[..., torch.Tensor]) -> Op:
    return lambda x, _a, _opset: fn(*x)


#: The operators an OnnxModule runs, by ONNX op_type (default domain).
OPS: dict[str, Op] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "BatchNormalization": _batch_norm,
    "MaxPool": _pool("MaxPool"), "AveragePool": _pool("AveragePool"),
    "GlobalAveragePool": lambda x, _a, _o: x[0].mean(dim=list(range(2, x[0].ndim)), keepdim=True),
    "Gemm": _gemm, "MatMul": _elementwise(torch.matmul),
    "Add": _elementwise(torch.add), "Sub": _elementwise(torch.sub), "Mul": _elementwise(torch.mul),
    "Div": _elementwise(torch.div), "Pow": _elementwise(torch.pow), "Sqrt": _elementwise(torch.sqrt),
    "Relu": _elementwise(torch.relu), "Sigmoid": _elementwise(torch.sigmoid), "Tanh": _elementwise(torch.tanh),
    "HardSigmoid": _hard_sigmoid, "HardSwish": _elementwise(F.hardswish), "Clip": _clip,
    "LeakyRelu": lambda x, a, _o: F.leaky_relu(x[0], a.get("alpha", 0.01)),
    "Softmax": _softmax, "Identity": _elementwise(lambda t: t),
    "Reshape": _reshape, "Shape": _shape, "Slice": _slice, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Flatten": lambda x, a, _o: x[0].reshape(math.prod(x[0].shape[:a.get("axis", 1)]), -1),
    "Concat": lambda x, a, _o: torch.cat(x, dim=a["axis"]),
    "Transpose": lambda x, a, _o: x[0].permute(a.get("perm", list(reversed(range(x[0].ndim))))),
    "Cast": lambda x, a, _o: x[0].to(DTYPES[a["to"]]),
    "ReduceMean": _reduce_mean, "Resize": _resize,
}


def _attributes(node: Any) -> dict[str, Any]:
    helper = _onnx().helper
    out = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        out[attribute.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _constant(name: str, value: np.ndarray, data_type: int) -> torch.Tensor:
    """A graph constant (not a weight) as a tensor; an element type torch lacks is refused by name."""
    if data_type not in DTYPES:
        raise KernelpackError(f"element type {data_type} has no torch dtype", tensor=name, field="data_type")
    return torch.from_numpy(np.array(value, copy=True))


class OnnxModule(nn.Module):
    """An ONNX model's graph run with torch ops; its weights are parameters (module doc)."""

    def __init__(self, src: Any, logits: bool = False) -> None:
        super().__init__()
        model = read_model(src)
        self._source = source_name(src)
        try:
            graph, weights = take_out(model)
            self._setup(graph, weights, logits)
        except KernelpackError as exc:
            raise exc.located(path=self._source) from None

    def _setup(self, model: Any, weights: Mapping[str, np.ndarray], logits: bool) -> None:
        graph = model.graph
        self._graph = model.SerializeToString()  # weights as references, as pack_onnx attaches it
        checked(self._graph, weights, self._source)
        self._opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
        self._weights = list(weights)
        for name, value in weights.items():
            self._place(name, nn.Parameter(torch.from_numpy(np.array(value, dtype=np.float32))))
        constants: dict[str, torch.Tensor] = {}
        for tensor in graph.initializer:
            if tensor.name not in weights:
                constants[tensor.name] = _constant(tensor.name, tensor_array(tensor), tensor.data_type)
        self._nodes: list[tuple[str, Op, list[str], list[str], dict[str, Any]]] = []
        for i, node in enumerate(graph.node):
            where = f"graph.node[{i}] '{node.name}' ({node.op_type})"
            if node.op_type == "Constant":
                attrs = {a.name: a for a in node.attribute}
                if set(attrs) != {"value"}:
                    raise KernelpackError("a Constant without a 'value' tensor is not supported", field=where)
                value = attrs["value"].t
                constants[node.output[0]] = _constant(node.output[0], tensor_array(value), value.data_type)
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
                raise KernelpackError(f"operator {node.op_type} is not one an OnnxModule runs "
                                      f"(kernelpack.converters.onnx_module.OPS)", field=where)
            self._nodes.append((where, OPS[node.op_type], list(node.input), list(node.output), _attributes(node)))
            if node.op_type == "BatchNormalization":  # its statistics stay as they are (module doc)
                for name in node.input[3:5]:
                    if name in weights:
                        self.get_parameter(name).requires_grad_(False)
        self._constants = list(constants)
        for j, (name, value) in enumerate(constants.items()):
            self.register_buffer(f"_constant_{j}", value, persistent=False)
        known = set(weights) | set(constants)
        self._inputs = [i.name for i in graph.input if i.name not in known]
        self._outputs = [self._logit_source(graph, o.name) if logits else o.name for o in graph.output]

    def _place(self, name: str, param: nn.Parameter) -> None:
        """Register ``param`` at the dotted path ``name`` (a plain submodule for every dot)."""
        owner: nn.Module = self
        *path, last = name.split(".")
        for i, part in enumerate([*path, last]):
            free = part and not hasattr(owner, part)
            if not free and not (i < len(path) and type(getattr(owner, part, None)) is nn.Module):
                raise KernelpackError(f"cannot be a parameter path of the module: its part {part!r} is empty "
                                      f"or taken (by torch.nn.Module or by another weight)", tensor=name)
            if i == len(path):
                owner.register_parameter(part, param)
            else:
                if free:
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)

    @staticmethod
    def _logit_source(graph: Any, name: str) -> str:
        """The input of the Softmax that makes output ``name`` (through Identity nodes), else ``name``."""
        makers = {out: node for node in graph.node for out in node.output}
        current = name
        while current in makers and makers[current].op_type == "Identity":
            current = makers[current].input[0]
        node = makers.get(current)
        return node.input[0] if node is not None and node.op_type == "Softmax" else name

    @property
    def weight_names(self) -> list[str]:
        """The ONNX names of the graph's weights, in graph order: the module's parameter paths."""
        return list(self._weights)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        """Run the graph: inputs by position, then by name; one output as a tensor, several as a tuple."""
        if len(args) > len(self._inputs) or set(kwargs) - set(self._inputs[len(args):]):
            raise KernelpackError(f"takes the graph inputs {self._inputs}, got {len(args)} positional and "
                                  f"{sorted(kwargs)} by name", path=self._source, field="inputs")
        values: dict[str, Any] = {"": None}
        values.update(zip(self._inputs, args))
        values.update(kwargs)
        if missing := [n for n in self._inputs if n not in values]:
            raise KernelpackError(f"graph input(s) {missing} not given", path=self._source, field="inputs")
        values.update((name, getattr(self, f"_constant_{j}")) for j, name in enumerate(self._constants))
        values.update((name, self._weight(name)) for name in self._weights)
        for where, op, inputs, outputs, attrs in self._nodes:
            try:
                result = op([values[i] for i in inputs], attrs, self._opset)
            except KernelpackError as exc:
                raise KernelpackError(exc.reason, path=self._source, field=f"{where}.{exc.field}") from None
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise KernelpackError(f"failed: {exc}", path=self._source, field=where) from None
            for out, value in zip(outputs, result if isinstance(result, (tuple, list)) else [result]):
                values[out] = value
        results = tuple(values[o] for o in self._outputs)
        return results[0] if len(results) == 1 else results

    def _weight(self, name: str) -> torch.Tensor:
        """The weight at path ``name``: the parameter, or its form's dense value once compress_
        has parametrised it."""
        module, _, tensor = name.rpartition(".")
        return getattr(self.get_submodule(module), tensor)

    def save(self, path: str | os.PathLike, forms: FormPlan = None, metadata: Mapping[str, str] | None = None,
             level: int = DEFAULT_LEVEL) -> dict[str, Any]:
        """Pack as :func:`kernelpack.onnx_io.pack_onnx` does: the weights (trained forms as they are,
        others by ``forms``, e.g. the plan that compressed the module, else dense) and the graph."""
        return save(self, path, forms=forms, metadata=metadata, level=level, attachments={GRAPH: self._graph})


def from_onnx(src: Any, logits: bool = False) -> OnnxModule:
    """An ONNX model (path, bytes or ModelProto) as a trainable :class:`OnnxModule`."""
    return OnnxModule(src, logits=logits)
