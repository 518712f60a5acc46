"""ONNX in: weights (initializers and Constant nodes) become container tensors under a per-tensor
plan, the graph is attached with references to them, everything else is kept exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
from ocr_inputs import CLS, ppocr_model

import kernelpack
from kernelpack.cli import main
from kernelpack.errors import KernelpackError
from kernelpack.forms import Dense, Series
from kernelpack.ort import GRAPH, LOCATION, ort_session

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from kernelpack.onnx_io import (MIN_ELEMENTS, dense_model, pack_onnx, read_model, take_out,  # noqa: E402
                                unpack_onnx, weight_roles)

CPU = ["CPUExecutionProvider"]
#: (name, shape) of the synthetic model's weights and the role the packer must see
ROLES = {"conv.w": "conv", "fc.w": "matrix", "proj": "matrix"}
#: BatchNormalization parameters: planned too, in float storage only.
AFFINE = {"bn.scale": "affine", "bn.bias": "affine", "bn.mean": "affine", "bn.var": "affine"}


def smooth_kernels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Kernels that a 2x2 Chebyshev series at the CGL points holds exactly (a series fit is lossless
    up to its float16 coefficients), so the plan has something to compress."""
    points = np.array([1.0, 0.0, -1.0])  # cgl, k = 3
    table = np.stack([np.ones(3), points])  # T_0, T_1
    coefficients = rng.standard_normal((*shape[:-2], 2, 2))
    return np.einsum("...pq,pi,qj->...ij", coefficients, table, table)


def synthetic(dtype: type = np.float32) -> onnx.ModelProto:
    """x * gain (3x8x8) -> Conv (16x3x3x3) -> BatchNorm -> + shared Constant, twice -> Clip(0, 6) -> Reshape -> Gemm
    (transB) -> MatMul -> + Constant offset; float or float16 throughout."""
    rng = np.random.default_rng(0)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT

    def init(name: str, value: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    def constant(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))

    low_rank = rng.standard_normal((10, 2)) @ rng.standard_normal((2, 1024)) / 30
    initializers = [
        init("conv.w", smooth_kernels(rng, (16, 3, 3, 3))),
        init("bn.scale", rng.uniform(0.5, 1.5, 16)), init("bn.bias", rng.standard_normal(16)),
        init("bn.mean", rng.standard_normal(16) / 10), init("bn.var", rng.uniform(0.5, 1.5, 16)),
        init("fc.w", low_rank), init("fc.b", rng.standard_normal(10)),
    ]
    nodes = [
        constant("shared", rng.standard_normal((16, 1, 1)).astype(dtype)),
        constant("shape", np.array([-1, 1024], dtype=np.int64)),
        constant("lo", np.array(0.0, dtype=dtype)), constant("hi", np.array(6.0, dtype=dtype)),
        constant("proj", rng.standard_normal((10, 32)).astype(dtype)),
        constant("offset", rng.standard_normal(32).astype(dtype)),
        constant("gain", rng.uniform(0.5, 1.5, (3, 8, 8)).astype(dtype)),
        helper.make_node("Mul", ["x", "gain"], ["xg"]),
        helper.make_node("Conv", ["xg", "conv.w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n"]),
        helper.make_node("Add", ["n", "shared"], ["a1"]),
        helper.make_node("Add", ["a1", "shared"], ["a2"]),
        helper.make_node("Clip", ["a2", "lo", "hi"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "proj"], ["m"]),
        helper.make_node("Add", ["m", "offset"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", elem, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", elem, ["N", 32])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="kernelpack-test", producer_version="1")
    helper.set_model_props(model, {"purpose": "unit test"})
    onnx.checker.check_model(model)
    return model


def run_onnx(model: bytes | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    model = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(model, providers=CPU).run(None, feeds)


def inputs(dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(dtype)}


def references(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    return {t.name: t for t in graph.initializer if t.data_location == TensorProto.EXTERNAL}


def attached_graph(path: str | os.PathLike) -> onnx.ModelProto:
    with kernelpack.open(path) as c:
        return onnx.load_from_string(c.read_attachment(GRAPH))


# --- what is a weight, what is kept ------------------------------------------------------------
def test_weights_are_float_tensors_of_16_elements_or_more_and_the_rest_stays_in_the_graph():
    model = synthetic()
    stripped, weights = take_out(model)
    assert list(weights) == ["conv.w", "bn.scale", "bn.bias", "bn.mean", "bn.var", "fc.w", "shared", "proj",
                             "offset", "gain"]
    assert MIN_ELEMENTS == 16  # fc.b (10 elements) and the Clip bounds stay; the int64 shape always
    kept_nodes = [n for n in stripped.graph.node if n.op_type == "Constant"]
    assert [n.output[0] for n in kept_nodes] == ["shape", "lo", "hi"]
    assert [n for n in stripped.graph.node if n.op_type != "Constant"] == \
        [n for n in model.graph.node if n.op_type != "Constant"]
    assert stripped.graph.initializer[6] == model.graph.initializer[6]  # fc.b, bit for bit
    for field in ("ir_version", "opset_import", "producer_name", "producer_version", "metadata_props"):
        assert getattr(stripped, field) == getattr(model, field), field
    refs = references(stripped.graph)
    assert list(refs) == list(weights)
    for name, ref in refs.items():  # a reference: name, type, dims, no data, location kernelpack
        assert (ref.data_type, list(ref.dims)) == (TensorProto.FLOAT, list(weights[name].shape))
        assert [(e.key, e.value) for e in ref.external_data] == [("location", LOCATION)]
        assert not ref.raw_data and not ref.float_data
    shared_uses = [n for n in stripped.graph.node if "shared" in n.input]
    assert len(shared_uses) == 2  # a Constant read twice is one tensor


def test_only_weights_biases_and_normalisations_have_a_role():
    stripped, weights = take_out(synthetic())
    roles = weight_roles(stripped.graph)
    assert {name: roles[name] for name in weights if name in roles} == {**ROLES, **AFFINE}


def test_real_constant_node_weights_are_taken_out_and_values_kept_bit_for_bit(tmp_path):
    src = ppocr_model(CLS)
    model = read_model(src)
    path = tmp_path / "cls.kpk"
    pack_onnx(src, path, max_error=None)  # every weight exact
    graph = attached_graph(path)
    values = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant"}
    taken = {name for name, v in values.items() if v.dtype == np.float32 and v.size >= MIN_ELEMENTS}
    assert not model.graph.initializer and len(taken) == 183  # PP-OCR keeps its weights in Constants
    assert set(references(graph.graph)) == taken
    left = [n for n in graph.graph.node if n.op_type == "Constant"]
    assert {n.output[0] for n in left} == set(values) - taken
    assert all(n in model.graph.node for n in graph.graph.node)  # every other node as it was
    decoded = kernelpack.load_numpy(path)
    assert set(decoded) == taken
    for name in taken:
        assert decoded[name].dtype == values[name].dtype and np.array_equal(decoded[name], values[name])
    assert (graph.opset_import, graph.ir_version) == (model.opset_import, model.ir_version)


# --- the plan --------------------------------------------------------------------------------
def rel_rms(decoded: np.ndarray, original: np.ndarray) -> float:
    original = original.astype(np.float64)
    return float(np.linalg.norm(decoded.astype(np.float64) - original) / np.linalg.norm(original))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_budget_plan_compresses_conv_and_matrix_weights_within_max_error(tmp_path, dtype):
    model = synthetic(dtype)
    _, original = take_out(model)
    path = tmp_path / "planned.kpk"
    encoded = pack_onnx(model, path, max_error=0.01)
    decoded = kernelpack.load_numpy(path)
    assert encoded["conv.w"].form != "dense" and encoded["fc.w"].form != "dense"
    for name in {**ROLES, **AFFINE}:
        assert rel_rms(decoded[name], original[name]) <= 0.01, name
    for name in AFFINE:  # float16 at most, never codes
        assert encoded[name].form == "dense" and encoded[name].data.dtype in ("float16", "float32")
    for name in set(original) - set(ROLES) - set(AFFINE):  # shared constants, offsets, gain (3x8x8): exact
        assert encoded[name].form == "dense"
        assert decoded[name].dtype == original[name].dtype and np.array_equal(decoded[name], original[name])
    out, ref = ort_session(path, CPU).run(None, inputs(dtype))[0], run_onnx(model, inputs(dtype))[0]
    assert out.dtype == dtype
    assert np.abs(out.astype(np.float64) - ref).max() <= 0.05 * np.abs(ref).max()


def test_forms_name_weights_first_then_the_plan_then_dense(tmp_path):
    encoded = pack_onnx(synthetic(), tmp_path / "f.kpk", forms={"conv.w": Series(harmonics=1),
                                                                  "bn.*": Dense(dtype="float16")},
                        max_error=0.01)
    assert encoded["conv.w"].form == "series" and encoded["conv.w"].harmonics == (1, 1)  # over budget: asked
    assert encoded["bn.var"].data.dtype == "float16"
    assert encoded["fc.w"].form != "dense"  # planned
    lossless = pack_onnx(synthetic(), tmp_path / "l.kpk", max_error=None)
    assert {(t.form, t.data.dtype) for t in lossless.values()} == {("dense", "float32")}


# --- lossless in, same model out --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_lossless_container_runs_bit_for_bit_like_the_original(tmp_path, dtype):
    model = synthetic(dtype)
    pack_onnx(model, tmp_path / "m.kpk", max_error=None)
    out = ort_session(tmp_path / "m.kpk", CPU).run(None, inputs(dtype))[0]
    assert np.array_equal(out, run_onnx(model, inputs(dtype))[0])


def test_unpack_rebuilds_a_plain_valid_onnx_model(tmp_path):
    pack_onnx(synthetic(), tmp_path / "m.kpk")
    model = dense_model(tmp_path / "m.kpk")
    onnx.checker.check_model(model, full_check=True)
    assert not references(model.graph)
    assert model.metadata_props == synthetic().metadata_props
    session = ort_session(tmp_path / "m.kpk", CPU)
    assert np.array_equal(run_onnx(model, inputs())[0], session.run(None, inputs())[0])


# --- the command line ------------------------------------------------------------------------
def test_cli_packs_an_onnx_model_and_unpacks_it_to_onnx(tmp_path, capsys):
    src, kpk, out = tmp_path / "m.onnx", tmp_path / "m.kpk", tmp_path / "dense.onnx"
    onnx.save(synthetic(), src)
    assert main(["pack", str(src), str(kpk), "--form", "proj=dct:keep=0.5", "--max-error", "0.02"]) == 0
    assert "10 tensors" in capsys.readouterr().out
    with kernelpack.open(kpk) as c:
        assert c.info("proj").form == "dct" and c.info("conv.w").form != "dense"
        assert c.attachments() == [GRAPH]
    assert main(["unpack", str(kpk), str(out)]) == 0
    assert "ONNX model" in capsys.readouterr().out
    assert np.array_equal(run_onnx(str(out), inputs())[0], ort_session(kpk, CPU).run(None, inputs())[0])
    assert main(["pack", str(src), str(kpk), "--max-error", "0", "-f"]) == 0
    assert np.array_equal(ort_session(kpk, CPU).run(None, inputs())[0], run_onnx(synthetic(), inputs())[0])


def test_bad_onnx_input_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf")
    assert main(["pack", str(bad), str(tmp_path / "o.kpk")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kernelpack: error: ") and str(bad) in err and err.count("\n") == 1
    with pytest.raises(KernelpackError, match="no such file"):
        pack_onnx(tmp_path / "missing.onnx", tmp_path / "o.kpk")
    np.savez(tmp_path / "w.npz", w=np.ones(3, np.float32))
    assert main(["pack", str(tmp_path / "w.npz"), str(tmp_path / "o.kpk"), "--calibration",
                 str(tmp_path / "w.npz"), "--max-error", "0.1"]) == 2  # a state dict has no graph to run
    assert "--calibration" in capsys.readouterr().err


def test_a_graph_that_does_not_fit_its_tensors_is_refused_naming_tensor_and_field(tmp_path):
    stripped, weights = take_out(synthetic())
    graph = stripped.SerializeToString()
    missing = dict(weights)
    del missing["proj"]
    kernelpack.save(missing, tmp_path / "missing.kpk", attachments={GRAPH: graph})
    with pytest.raises(KernelpackError) as info:
        ort_session(tmp_path / "missing.kpk", CPU)
    index = [t.name for t in stripped.graph.initializer].index("proj")
    assert (info.value.tensor, info.value.field) == ("proj", f"attachments.{GRAPH}.graph.initializer[{index}].name")
    assert str(tmp_path / "missing.kpk") in str(info.value)
    reshaped = {**weights, "proj": weights["proj"].T.copy()}
    kernelpack.save(reshaped, tmp_path / "shape.kpk", attachments={GRAPH: graph})
    with pytest.raises(KernelpackError) as info:
        ort_session(tmp_path / "shape.kpk", CPU)
    assert (info.value.tensor, info.value.field) == ("proj", "shape")
    kernelpack.save(weights, tmp_path / "none.kpk")
    with pytest.raises(KernelpackError, match="no attachment"):
        ort_session(tmp_path / "none.kpk", CPU)
    kernelpack.save(weights, tmp_path / "junk.kpk", attachments={GRAPH: b"\x3a\xff\xff"})
    with pytest.raises(KernelpackError) as info:
        ort_session(tmp_path / "junk.kpk", CPU)
    assert info.value.field == f"attachments.{GRAPH}"


def test_an_initializer_whose_data_does_not_fit_its_dims_is_refused_naming_it(tmp_path, capsys):
    model = synthetic()
    model.graph.initializer[0].dims[0] = 17  # conv.w: 16x3x3x3 of data, dims say 17
    src = tmp_path / "bad_dims.onnx"
    onnx.save(model, src)
    with pytest.raises(KernelpackError) as info:
        pack_onnx(src, tmp_path / "o.kpk")
    assert (info.value.path, info.value.tensor, info.value.field) == (str(src), "conv.w", "dims")
    assert main(["pack", str(src), str(tmp_path / "o.kpk")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kernelpack: error: ") and "conv.w" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o.kpk")


def test_bad_model_bytes_and_unread_external_data_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(KernelpackError, match="cannot read as ONNX"):
        pack_onnx(b"\x08\x07 this is not a protobuf", tmp_path / "o.kpk")
    model = synthetic()
    shape = next(n for n in model.graph.node if n.output[0] == "shape")  # an int64 Constant: stays in the graph
    shape.attribute[0].t.data_location = TensorProto.EXTERNAL
    shape.attribute[0].t.external_data.add(key="location", value="shape.bin")
    with pytest.raises(KernelpackError) as info:  # bytes: the packer reads no file beside them
        pack_onnx(model.SerializeToString(), tmp_path / "o.kpk")
    index = [n.output[0] for n in take_out(synthetic())[0].graph.node].index("shape")
    assert info.value.tensor == "shape"  # where it would sit in the attachment:
    assert info.value.field == f"attachments.{GRAPH}.graph.node[{index}].attribute[0].t.external_data"
    model = synthetic()
    fc_b = model.graph.initializer[6]  # 10 elements: not a weight; made a reference it would keep
    fc_b.ClearField("raw_data")
    fc_b.data_location = TensorProto.EXTERNAL
    fc_b.external_data.add(key="location", value=LOCATION)
    with pytest.raises(KernelpackError, match="refers to external data 'kernelpack'") as info:
        pack_onnx(model.SerializeToString(), tmp_path / "o.kpk")
    assert info.value.tensor == "fc.b"
    assert not os.path.exists(tmp_path / "o.kpk")


def test_an_attachment_onnx_cannot_parse_is_refused_by_unpack(tmp_path):
    """A graph whose tensors pass the check but whose other fields protobuf refuses (here a
    truncated packed ``ints`` attribute): KernelpackError, no file written."""
    bad_ints = b"\x42\x02\x08\xff"  # AttributeProto.ints, packed: one varint cut off
    node = b"\x2a" + bytes([len(bad_ints)]) + bad_ints  # NodeProto.attribute
    graph = b"\x3a" + bytes([len(node) + 2]) + b"\x0a" + bytes([len(node)]) + node  # ModelProto.graph.node
    kernelpack.save({"w": np.ones(3, np.float32)}, tmp_path / "m.kpk", attachments={GRAPH: graph})
    with pytest.raises(KernelpackError, match="not a valid ONNX ModelProto") as info:
        unpack_onnx(tmp_path / "m.kpk", tmp_path / "out.onnx")
    assert info.value.field == f"attachments.{GRAPH}" and not os.path.exists(tmp_path / "out.onnx")


def test_weights_holding_nan_or_infinity_are_not_planned_but_stored_exactly(tmp_path):
    model = synthetic()
    for index, bad in ((0, np.nan), (5, np.inf)):  # conv.w and fc.w, both planned otherwise
        value = numpy_helper.to_array(model.graph.initializer[index]).copy()
        value.flat[3] = bad
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, model.graph.initializer[index].name))
    encoded = pack_onnx(model, tmp_path / "m.kpk", max_error=0.01)
    assert encoded["conv.w"].form == "dense" and encoded["fc.w"].form == "dense"
    decoded = kernelpack.load_numpy(tmp_path / "m.kpk")
    assert np.array_equal(decoded["conv.w"], numpy_helper.to_array(model.graph.initializer[0]), equal_nan=True)


def test_unpack_to_onnx_writes_atomically_and_refuses_a_folder(tmp_path, monkeypatch):
    pack_onnx(synthetic(), tmp_path / "m.kpk", max_error=None)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"the previous file")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(KernelpackError, match="is a folder"):
        unpack_onnx(tmp_path / "m.kpk", tmp_path / "folder.onnx")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(KernelpackError, match="No space left") as info:
        unpack_onnx(tmp_path / "m.kpk", out)
    assert info.value.path == str(out) and out.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.onnx", "m.kpk", "out.onnx"]  # no temporary left
    monkeypatch.undo()
    unpack_onnx(tmp_path / "m.kpk", out)
    assert np.array_equal(run_onnx(str(out), inputs())[0], run_onnx(synthetic(), inputs())[0])
