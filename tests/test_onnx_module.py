"""``from_onnx``: an ONNX model as a trainable torch module whose parameters are the graph's
weights at their ONNX names; it computes what ONNX Runtime computes, trains in its forms, and
packs back into a container that ONNX Runtime serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ocr_inputs import CLS, ppocr_model

import kernelpack
from kernelpack.converters import compress_, distill
from kernelpack.errors import KernelpackError
from kernelpack.forms import Dense, Linear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from test_onnx_in import AFFINE, ROLES, inputs, run_onnx, synthetic  # noqa: E402

from kernelpack.converters.onnx_module import OPS, from_onnx  # noqa: E402
from kernelpack.ort import ort_session  # noqa: E402


def forward(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def test_parameters_are_the_weights_at_their_onnx_names() -> None:
    module = from_onnx(synthetic())
    names = set(ROLES) | set(AFFINE) | {"shared", "offset", "gain"}  # fc.b: 10 elements, a constant
    assert {n for n, _ in module.named_parameters()} == names
    assert set(module.state_dict()) == names  # shapes and the other constants are not state
    assert module.weight_names == [n for n in module.weight_names if n in names]


def test_computes_what_onnx_runtime_computes() -> None:
    model = synthetic()
    x = inputs()["x"]
    np.testing.assert_allclose(forward(from_onnx(model), x), run_onnx(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_real_model_with_softmax_and_shape_arithmetic() -> None:
    path = ppocr_model(CLS)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 48, 192)).astype(np.float32)
    expected = run_onnx(path, {"x": x})[0]
    np.testing.assert_allclose(forward(from_onnx(path), x), expected, atol=1e-5)
    logits = forward(from_onnx(path, logits=True), x)
    assert not np.allclose(logits.sum(-1), 1.0)  # the Softmax's input, not its output
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), -1).numpy(), expected, atol=1e-5)


def test_every_weight_but_the_batch_norm_statistics_trains() -> None:
    module = from_onnx(synthetic())
    module(torch.from_numpy(inputs()["x"])).square().sum().backward()
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen == {"bn.mean", "bn.var"}
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()
               if n not in frozen)
    compress_(module, {"bn.var": Dense(step=0.01)})  # still frozen inside its parametrisation
    assert not module.get_parameter("bn.parametrizations.var.original0").requires_grad


def test_trained_in_its_forms_and_packed_it_serves_what_it_computes(tmp_path) -> None:
    model = synthetic()
    module = from_onnx(model)
    plan = kernelpack.plan(model, max_error=0.02, progress=False)
    compress_(module, plan)
    x = torch.from_numpy(inputs()["x"])
    distill(module, from_onnx(model), [x, x * 0.5], epochs=2, lr=1e-3, progress=False)
    path = tmp_path / "student.kpk"
    written = module.save(path, forms=plan)
    assert set(written) == set(module.weight_names)
    assert {written[n].form for n in plan if isinstance(plan[n], Linear)} <= {"linear"}
    served = ort_session(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(served, forward(module, x.numpy()), rtol=1e-4, atol=1e-4)


def test_plan_entries_for_biases_train_quantised() -> None:
    """A plan names biases and norm parameters exactly with Dense configs: compress_ quantises
    them in the forward pass too, so the trained values are the packed ones."""
    module = from_onnx(synthetic())
    compress_(module, {"bn.bias": Dense(step=0.25), "conv.w": Dense(step=0.01)})
    bias = module.bn.bias.detach().numpy()
    np.testing.assert_array_equal(bias, np.round(bias / 0.25) * 0.25)
    plain = from_onnx(synthetic())
    with pytest.warns(UserWarning, match="bn"):  # a pattern does not reach rank-1 parameters
        compress_(plain, {"bn.*": Dense(step=0.25)})
    assert not torch.nn.utils.parametrize.is_parametrized(plain.bn)


def test_an_operator_it_does_not_run_is_refused_by_name() -> None:
    node = helper.make_node("Erf", ["x"], ["y"], name="the_erf")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert "Erf" not in OPS
    with pytest.raises(KernelpackError, match=r"graph.node\[0\] 'the_erf' \(Erf\).*operator Erf"):
        from_onnx(model)


def test_wrong_inputs_are_one_clear_error() -> None:
    module = from_onnx(synthetic())
    with pytest.raises(KernelpackError, match="graph inputs"):
        module(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(KernelpackError, match=r"graph.node\[\d+\] '.*' \(Mul\).*failed"):
        module(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("name", ["a..b", "training", "fc.forward"])
def test_a_weight_name_that_cannot_be_a_parameter_path_is_refused(name: str) -> None:
    tensor = numpy_helper.from_array(np.ones((4, 4), np.float32), name)
    node = helper.make_node("MatMul", ["x", name], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(KernelpackError, match=f"tensor '{name}'.*cannot be a parameter path"):
        from_onnx(model)
