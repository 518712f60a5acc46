"""Calibration statistics (kernelpack.converters.calibration): H = E[x x^T] of what each weight
multiplies, streamed through ONNX Runtime or torch hooks, equal to H computed directly."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
F = torch.nn.functional

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from kernelpack import KernelpackError  # noqa: E402
from kernelpack.converters import calibration as cal  # noqa: E402

#: float32 inputs: their chunks' products are float32 (calibration module doc, "Bounds").
RTOL = 1e-6


def _graph(nodes: list, inputs: dict[str, list], weights: dict[str, np.ndarray], outputs: list[str]) -> bytes:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def _close(a: np.ndarray, b: np.ndarray, rtol: float = RTOL) -> None:
    assert np.abs(a - b).max() <= rtol * np.abs(b).max(), np.abs(a - b).max() / np.abs(b).max()


def _moments(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(groups, K, K) and (groups, K) moments of rows (samples, groups, K), directly."""
    rows = rows.double()
    return (torch.einsum("sgk,sgl->gkl", rows, rows) / rows.shape[0]).numpy(), rows.mean(0).numpy()


def _unfolded(x: np.ndarray, kernel: tuple, stride: int, pads: tuple, dilation: int, groups: int) -> torch.Tensor:
    """im2col of x by torch's unfold: (samples, groups, K); pads = (top, left, bottom, right)."""
    xp = F.pad(torch.from_numpy(x).double(), (pads[1], pads[3], pads[0], pads[2]))
    cols = F.unfold(xp, kernel, dilation=dilation, stride=stride)  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, groups, cols.shape[1] // groups)


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- ONNX: H equals the directly computed moments ---------------------------------------------
CONVS = {  # weight name -> (shape, strides, pads (t, l, b, r), dilation, group, reads relu output)
    "c_stride_pad": ((5, 3, 3, 3), 2, (1, 0, 2, 1), 1, 1, True),
    "c_dilated": ((4, 3, 3, 2), 1, (2, 2, 2, 2), 2, 1, False),
    "c_grouped": ((6, 1, 3, 3), 1, (1, 1, 1, 1), 1, 3, True),
}


def _conv_model() -> tuple[bytes, dict[str, np.ndarray]]:
    rng = _rng()
    weights = {n: rng.standard_normal(s[0]) for n, s in CONVS.items()}
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    for name, (_, stride, pads, dilation, group, relu) in CONVS.items():
        nodes.append(helper.make_node("Conv", ["r" if relu else "x", name], [name + "_y"], strides=[stride] * 2,
                                      pads=[pads[0], pads[1], pads[2], pads[3]], dilations=[dilation] * 2,
                                      group=group))
    return _graph(nodes, {"x": [None, 3, 11, 9]}, weights, [n + "_y" for n in CONVS]), weights


def test_conv_h_equals_unfold_moments_for_stride_pad_dilation_group():
    model, _ = _conv_model()
    x = _rng().standard_normal((5, 3, 11, 9)).astype(np.float32)
    stats = cal.collect_onnx(model, {"x": x}, batch_size=2)
    for name, (shape, stride, pads, dilation, group, relu) in CONVS.items():
        rows = _unfolded(np.maximum(x, 0) if relu else x, shape[2:], stride, pads, dilation, group)
        h, mean = _moments(rows)
        assert stats[name].h.shape == h.shape == (group, shape[1] * shape[2] * shape[3]) + (shape[1] * shape[2] * shape[3],)
        _close(stats[name].h, h)
        _close(stats[name].mean, mean)
        assert stats[name].count == stats[name].samples == rows.shape[0]


@pytest.mark.parametrize("auto_pad, pads", [("SAME_UPPER", (0, 0, 1, 1)), ("SAME_LOWER", (1, 1, 0, 0))])
def test_conv_auto_pad_same_pads_as_onnx_defines(auto_pad, pads):
    w = _rng().standard_normal((2, 3, 3, 3))
    model = _graph([helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], auto_pad=auto_pad)],
                   {"x": [None, 3, 8, 8]}, {"w": w}, ["y"])
    x = _rng().standard_normal((2, 3, 8, 8)).astype(np.float32)
    h, _ = _moments(_unfolded(x, (3, 3), 2, pads, 1, 1))
    _close(cal.collect_onnx(model, {"x": x})["w"].h, h)


def _matrix_model() -> tuple[bytes, dict[str, np.ndarray]]:
    rng = _rng()
    weights = {"gemm_tb": rng.standard_normal((5, 6)), "gemm_b": rng.standard_normal((6, 4)),
               "mm": rng.standard_normal((6, 3)), "mm_left": rng.standard_normal((3, 7))}
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Gemm", ["r", "gemm_tb"], ["y1"], transB=1, alpha=2.0),
             helper.make_node("Gemm", ["x", "gemm_b"], ["y2"]),
             helper.make_node("MatMul", ["s", "mm"], ["y3"]),
             helper.make_node("MatMul", ["mm_left", "t"], ["y4"])]
    return _graph(nodes, {"x": [None, 6], "s": [None, 4, 6], "t": [None, 7, 3]}, weights,
                  ["y1", "y2", "y3", "y4"]), weights


def _matrix_inputs() -> dict[str, np.ndarray]:
    rng = _rng()
    return {"x": rng.standard_normal((6, 6)).astype(np.float32), "s": rng.standard_normal((6, 4, 6)).astype(np.float32),
            "t": rng.standard_normal((6, 7, 3)).astype(np.float32)}


def test_gemm_and_matmul_h_in_the_weights_orientation():
    model, _ = _matrix_model()
    inputs = _matrix_inputs()
    stats = cal.collect_onnx(model, inputs, batch_size=4)
    expect = {"gemm_tb": 2.0 * np.maximum(inputs["x"], 0), "gemm_b": inputs["x"],
              "mm": inputs["s"].reshape(-1, 6), "mm_left": inputs["t"].swapaxes(1, 2).reshape(-1, 7)}
    for name, rows in expect.items():
        h, mean = _moments(torch.from_numpy(rows)[:, None, :])
        _close(stats[name].h, h)
        _close(stats[name].mean, mean)
    assert [stats[n].layout for n in expect] == ["rows", "columns", "columns", "rows"]


# --- the key property: trace((W - W') H (W - W')^T) is the layer's mean squared output change ----
def test_output_error_equals_mean_squared_conv_output_change():
    model, weights = _conv_model()
    x = _rng().standard_normal((4, 3, 11, 9)).astype(np.float32)
    stats = cal.collect_onnx(model, {"x": x})
    for name, (shape, stride, pads, dilation, group, relu) in CONVS.items():
        approx = weights[name] + 0.1 * _rng().standard_normal(shape)
        xi = F.pad(torch.from_numpy(np.maximum(x, 0) if relu else x).double(), (pads[1], pads[3], pads[0], pads[2]))
        dy = F.conv2d(xi, torch.from_numpy(weights[name] - approx), stride=stride, dilation=dilation, groups=group)
        expected = float((dy ** 2).sum(1).mean())
        assert stats[name].output_error(weights[name], approx) == pytest.approx(expected, rel=RTOL)


def test_output_error_equals_mean_squared_matrix_output_change():
    model, weights = _matrix_model()
    inputs = _matrix_inputs()
    stats = cal.collect_onnx(model, inputs)
    rng = _rng()
    delta = {n: 0.1 * rng.standard_normal(w.shape) for n, w in weights.items()}
    x = inputs["x"].astype(np.float64)
    changes = {"gemm_tb": 2.0 * np.maximum(x, 0) @ delta["gemm_tb"].T, "gemm_b": x @ delta["gemm_b"],
               "mm": inputs["s"].reshape(-1, 6) @ delta["mm"],
               "mm_left": (delta["mm_left"] @ inputs["t"]).swapaxes(1, 2).reshape(-1, 3)}
    for name, dy in changes.items():
        expected = float((dy ** 2).sum(1).mean())
        assert stats[name].output_error(weights[name], weights[name] - delta[name]) == pytest.approx(expected, rel=RTOL)


def test_conv_transpose_output_error_equals_mean_squared_output_change():
    rng = _rng()
    w = rng.standard_normal((4, 3, 3, 3))  # (C_in, C_out/g, kh, kw), 2 groups
    model = _graph([helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 0, 1, 1],
                                     output_padding=[1, 0], group=2)], {"x": [None, 4, 5, 6]}, {"w": w}, ["y"])
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    stats = cal.collect_onnx(model, {"x": x})["w"]
    assert stats.h.shape == (2, 18, 18) and stats.layout == "conv_transpose"
    approx = w + 0.1 * rng.standard_normal(w.shape)
    full = F.conv_transpose2d(torch.from_numpy(x).double(), torch.from_numpy(w - approx), stride=2,
                              output_padding=(1, 0), groups=2)  # ONNX's asymmetric pads crop it below
    dy = full[:, :, 1:-1, 0:-1]
    assert dy.shape[2:] == (10, 12)  # 2*(5-1) + 1 + 3 - 1 - 1 and 2*(6-1) + 0 + 3 - 0 - 1
    assert stats.count == 3 * dy.shape[2] * dy.shape[3]
    assert stats.output_error(w, approx) == pytest.approx(float((dy ** 2).sum(1).mean()), rel=RTOL)


# --- torch hooks, and torch against ONNX --------------------------------------------------------
class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.grouped = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.up = torch.nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.fc = torch.nn.Linear(2 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(torch.relu(self.conv(x))))
        return self.fc(torch.relu(self.up(x)).flatten(1))


def _tiny() -> tuple[_Tiny, np.ndarray]:
    torch.manual_seed(0)
    return _Tiny(), _rng().standard_normal((6, 3, 8, 8)).astype(np.float32)


def test_torch_hooks_h_equals_unfold_moments():
    model, x = _tiny()
    model.train()
    stats = cal.collect_torch(model, x, batch_size=4)
    h, mean = _moments(_unfolded(x, (3, 3), 2, (1, 1, 1, 1), 1, 1))
    _close(stats["conv.weight"].h, h)
    _close(stats["conv.weight"].mean, mean)
    assert set(stats) == {"conv.weight", "grouped.weight", "up.weight", "fc.weight"}
    assert stats["grouped.weight"].h.shape == (2, 18, 18) and stats["fc.weight"].h.shape == (1, 128, 128)
    assert model.training  # the model's mode is restored


def test_torch_conv1d_with_reflect_padding_sees_the_padded_input():
    conv = torch.nn.Conv1d(2, 3, 3, padding=2, padding_mode="reflect", stride=2)
    x = _rng().standard_normal((4, 2, 9)).astype(np.float32)
    padded = F.pad(torch.from_numpy(x), (2, 2), mode="reflect").numpy()[:, :, None, :]
    h, _ = _moments(_unfolded(padded, (1, 3), 2, (0, 0, 0, 0), 1, 1))
    _close(cal.collect_torch(conv, x)["weight"].h, h)


def test_torch_and_onnx_collections_agree():
    model, x = _tiny()
    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.from_numpy(x[:1]),), buffer, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    kwargs = dict(batch_size=3, max_patches=40)  # subsampled: the same draws on both sides
    from_torch = cal.collect_torch(model, x, **kwargs)
    from_onnx = cal.collect_onnx(buffer.getvalue(), {"x": x}, **kwargs)
    assert set(from_onnx) == set(from_torch)
    for name, stats in from_torch.items():
        other = from_onnx[name]
        assert (other.count, other.samples, other.layout) == (stats.count, stats.samples, stats.layout)
        _close(other.h, stats.h, 1e-5)  # float32 activations of two runtimes


# --- bounds and determinism ----------------------------------------------------------------------
def test_patch_subsampling_is_deterministic_and_bounded():
    model, _ = _conv_model()
    x = _rng().standard_normal((6, 3, 11, 9)).astype(np.float32)
    first = cal.collect_onnx(model, {"x": x}, batch_size=3, max_patches=25)
    again = cal.collect_onnx(model, {"x": x}, batch_size=3, max_patches=25)
    other = cal.collect_onnx(model, {"x": x}, batch_size=3, max_patches=25, seed=1)
    full = cal.collect_onnx(model, {"x": x}, batch_size=3)
    for name in CONVS:
        assert np.array_equal(first[name].h, again[name].h)
        assert not np.array_equal(first[name].h, other[name].h)
        assert first[name].samples == 2 * 25 and first[name].count == full[name].count > 100
        ratio = np.trace(first[name].h.sum(0)) / np.trace(full[name].h.sum(0))
        assert 0.7 < ratio < 1.4  # drawn samples are weighted by seen/drawn: H estimates the full mean


def test_layers_above_max_k_get_no_statistics_and_a_warning():
    model, _ = _conv_model()
    x = _rng().standard_normal((2, 3, 11, 9)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="c_stride_pad: K = 27 > max_k = 20"):
        stats = cal.collect_onnx(model, {"x": x}, max_k=20)
    assert set(stats) == {"c_dilated", "c_grouped"}
    assert all(s.k <= 20 and s.h.shape == (s.groups, s.k, s.k) for s in stats.values())


def test_accumulation_holds_at_most_h_and_a_chunk(monkeypatch):
    monkeypatch.setattr(cal, "CHUNK_BYTES", 1 << 20)
    x = _rng().standard_normal((4, 64, 32, 32)).astype(np.float32)  # 4096 patches of K = 576: 19 MB in float64
    conv = cal._Conv(kernel=(3, 3), strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1), groups=1)
    source = cal._conv_rows(x, conv)
    acc = cal._Accumulator("rows", (8, 64, 3, 3), 1, 576)
    tracemalloc.start()
    acc.add(source, np.random.default_rng(0), 4096)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert acc.samples == 4096
    assert peak < 3 * cal.CHUNK_BYTES + acc.h.nbytes // 4


# --- inputs -------------------------------------------------------------------------------------
def test_inputs_must_match_the_model():
    model, _ = _conv_model()
    with pytest.raises(KernelpackError, match="do not match the model's inputs"):
        cal.collect_onnx(model, {"y": np.zeros((1, 3, 11, 9), np.float32)})
    with pytest.raises(KernelpackError, match="share their first axis"):
        cal.collect_onnx(_matrix_model()[0], {"x": np.zeros((2, 6)), "s": np.zeros((3, 4, 6)), "t": np.zeros((2, 7, 3))})


def test_load_inputs_reads_npz_without_pickle(tmp_path):
    path = tmp_path / "inputs.npz"
    arrays = {"x": np.arange(24, dtype=np.float32).reshape(4, 6), "ids": np.arange(4)}
    np.savez(path, **arrays)
    loaded = cal.load_inputs(path)
    assert set(loaded) == set(arrays) and all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    with pytest.raises(KernelpackError, match="more than max_bytes"):
        cal.load_inputs(path, max_bytes=100)
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(KernelpackError, match="object array"):
        cal.load_inputs(tmp_path / "pickled.npz")
    np.savez(tmp_path / "ragged.npz", x=np.zeros((4, 2)), y=np.zeros((3, 2)))
    with pytest.raises(KernelpackError, match="share their first axis"):
        cal.load_inputs(tmp_path / "ragged.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(KernelpackError, match="bad.npz"):
        cal.load_inputs(tmp_path / "bad.npz")


def test_split_is_disjoint_covering_and_seeded():
    inputs = {"x": np.arange(10.0)[:, None], "y": np.arange(10)}
    calib, held = cal.split(inputs, 0.7, seed=3)
    assert len(calib["x"]) == 7 and len(held["x"]) == 3
    assert sorted(np.concatenate([calib["y"], held["y"]])) == list(range(10))
    assert np.array_equal(calib["x"][:, 0], calib["y"])  # the arrays of one sample stay together
    assert np.array_equal(cal.split(inputs, 0.7, seed=3)[0]["y"], calib["y"])
    assert not np.array_equal(cal.split(inputs, 0.7, seed=4)[0]["y"], calib["y"])
    with pytest.raises(KernelpackError, match="fraction"):
        cal.split(inputs, 1.0)
