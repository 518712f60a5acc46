"""Quantised numbers (format 1.2, spec/FORMAT.md section 3.1): an array-ref with a ``step`` holds
int8/int16 codes q standing for the numbers float32(q) * float32(step). Every number array of
every form may be quantised, never an index; the encoders quantise the numbers they finally
store; training trains on exactly the stored numbers; a 1.1 reader refuses such a file rather
than misreading it; every bad step is refused naming tensor and field."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kernelpack
from conftest import RawFile, random_array
from kernelpack import DCT, Basis, Dense, Linear, Rule, Series
from kernelpack.forms import BasisTensor, DCTTensor, DenseTensor, LinearTensor, SeriesTensor
from kernelpack.forms._base import Stored, quantise, to_stored
from kernelpack.reader import Container

CONFIGS = {
    "dct": DCT(keep=0.4, step=2.0 ** -8),
    "dct-rel": DCT(keep=0.4, rel_step=0.01),
    "series": Series(harmonics=(3, 2), step=0.004),
    "basis": Basis(bank=4, rel_step=0.02),
    "linear": Linear(alpha=0.5, step=0.003),
    "linear-low-rank": Linear(alpha=0.5, rank=2, rel_step=0.01),
    "dense": Dense(step=0.002),
    "dense-rel": Dense(rel_step=0.05),
}
#: The arrays of numbers each form stores (the index of basis and order of linear are not).
NUMBERS = {"dct": {"coefficients"}, "series": {"coefficients"}, "basis": {"a", "b"},
           "linear": {"primaries", "A", "A1", "A2"}, "dense": {"data"}}


def weights(seed: int = 0) -> np.ndarray:
    return random_array(seed, (8, 4, 3, 3), scale_exp=-4)


def packed(path: Path, config: Any, value: np.ndarray | None = None) -> Path:
    kernelpack.save({"w": weights() if value is None else value}, path, forms={"w": config}, compact=False)
    return path


# --- the decode rule ------------------------------------------------------------------
def test_quantised_numbers_are_one_float32_product_rounded_to_nearest_even() -> None:
    tie = float(np.float32(1 + 2.0 ** -23))  # 3 * tie lies halfway between two float32
    stored = Stored(np.array([3, -3, 1, 0, -128], np.int8), "int8", tie)
    assert stored.values().dtype == np.float32
    assert stored.values().tolist() == [3 + 2.0 ** -21, -(3 + 2.0 ** -21), tie, 0.0, -128 * tie]
    subnormal = Stored(np.array([3, -32768], np.int16), "int16", 2.0 ** -149)
    assert subnormal.values().tolist() == [3 * 2.0 ** -149, 0.0 - 2.0 ** -134]  # no flush to zero


def small_tensor(form: str, numbers: Stored) -> Any:
    """A small tensor of ``form`` whose every number array is ``numbers`` (2 x 2) or a part of it."""
    def like(data: np.ndarray) -> Stored:
        return Stored(np.ascontiguousarray(data), numbers.dtype, numbers.step)

    q = numbers.data
    make = {
        "dct": lambda: DCTTensor((3, 2), (0, 1), like(q.reshape(4))),
        "series": lambda: SeriesTensor((3, 3), "cosine", ("cgl", "uniform"), numbers),
        "basis": lambda: BasisTensor((2, 2, 2), "bank", like(q.reshape(1, 2, 2)),
                                     Stored(np.zeros(2, np.uint8), "uint8"), like(q[0]), like(q[1])),
        "linear": lambda: LinearTensor((3, 2), like(q[:1]), (like(q[1:]),)),
        "dense": lambda: DenseTensor(numbers, "float32"),
    }
    return make[form]()


@pytest.mark.parametrize("form", sorted(NUMBERS))
def test_a_quantised_array_decodes_as_the_float32_numbers_it_stands_for(form: str) -> None:
    """The same bits as the same tensor with those numbers stored as float32: the numbers, not
    the codes, enter the decode (steps: a power of two, and one whose products round)."""
    from kernelpack._backend import NumpyOps

    for step in (0.25, float(np.float32(0.1))):
        codes = Stored(np.array([[3, -7], [120, -128]], np.int8), "int8", step)
        floats = Stored(codes.values(), "float32")
        quantised, reference = (small_tensor(form, s).decode(NumpyOps()) for s in (codes, floats))
        np.testing.assert_array_equal(quantised.view(np.uint32), reference.view(np.uint32))


# --- encoders ---------------------------------------------------------------------------
def test_codes_round_half_to_even_and_take_int8_when_they_fit() -> None:
    assert quantise(np.array([0.5, 1.5, 2.5, -0.5, -2.5]), 1.0).data.tolist() == [0, 2, 2, 0, -2]
    assert quantise(np.array([127.0, -127.0]), 1.0).dtype == "int8"
    assert quantise(np.array([128.0, 0.0]), 1.0).dtype == "int16"
    assert quantise(np.array([-32767.0]), 1.0).dtype == "int16"
    with pytest.raises(kernelpack.KernelpackError, match="does not fit int16") as caught:
        quantise(np.array([32767.6]), 1.0)
    assert caught.value.field == "step"


def test_the_step_is_rounded_to_float32_and_stored_as_it() -> None:
    stored = quantise(np.array([1.0]), 0.1)
    assert stored.step == float(np.float32(0.1)) and stored.data.tolist() == [10]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_form_round_trips_quantised_with_identical_numpy_and_torch_bits(name: str, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    path = packed(tmp_path / "q.kpk", CONFIGS[name])
    with Container(path) as c:
        assert c.version == (1, 2)
        info = c.info("w")
        numbers = NUMBERS[info.form] & set(info.arrays)
        assert numbers and all(info.arrays[k].spec.dtype in ("int8", "int16") and info.arrays[k].spec.step
                               for k in numbers)
        assert all(r.spec.step is None for k, r in info.arrays.items() if k not in numbers)
        assert all(r.spec.step is not None for r in c.bank_info().values())  # the basis bank too
        assert c.verify("numpy") == {"w": True} and c.verify("torch") == {"w": True}
        np.testing.assert_array_equal(c.get_numpy("w").view(np.uint32), c.get_tensor("w").numpy().view(np.uint32))


@pytest.mark.parametrize("config", [Dense(step=0.01), DCT(keep=1.0, step=0.01)], ids=["dense", "dct-all"])
def test_the_error_of_a_step_is_about_step_over_sqrt_12(config: Any, tmp_path: Path) -> None:
    """Uniform rounding error; the orthonormal DCT keeps it (all coefficients kept)."""
    w = random_array(1, (64, 32, 3, 3))
    error = kernelpack.load_numpy(packed(tmp_path / "q.kpk", config, w))["w"] - w
    assert math.sqrt(np.mean(np.square(error, dtype=np.float64))) == pytest.approx(0.01 / math.sqrt(12), rel=0.05)


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.rel_step is not None])
def test_rel_step_is_relative_to_each_arrays_rms(name: str) -> None:
    encoded = CONFIGS[name].encode(weights(), "float32")
    quantised = [s for s in [*encoded.arrays().values(), *encoded.banks().values()] if s.step is not None]
    assert len(quantised) == len(NUMBERS[encoded.form] & set(encoded.arrays())) + len(encoded.banks())
    for stored in quantised:
        rms = math.sqrt(np.mean(np.square(stored.values(), dtype=np.float64)))
        assert stored.step == pytest.approx(CONFIGS[name].rel_step * rms, rel=0.01)


def test_basis_and_linear_fit_against_the_quantised_numbers_they_store() -> None:
    """a, b are the least-squares fit to the stored (quantised) bank; A to the stored primaries;
    each then quantised. A fit to the unquantised numbers gives other codes."""
    from kernelpack.forms.basis import fit_slices

    w, step = weights().astype(np.float64), 0.05
    basis = Basis(bank=4, step=step).encode(w)
    unit = Basis(bank=4, dtype="float32").encode(w).bank.values().reshape(4, -1)
    for bank, same in ((basis.bank.values().reshape(4, -1), True), (unit, False)):
        _, a, b = fit_slices(w.reshape(-1, 9), bank.astype(np.float64))
        codes = np.concatenate([quantise(a, basis.a.step).data, quantise(b, basis.b.step).data])
        assert np.array_equal(codes, np.concatenate([basis.a.data, basis.b.data])) == same
    linear = Linear(primaries=4, pivot=False, step=step).encode(w)
    rest = w.reshape(8, -1)[4:]
    for primaries, same in ((linear.primaries.values(), True), (w[:4], False)):
        a = np.linalg.lstsq(primaries.reshape(4, -1).T.astype(np.float64), rest.T, rcond=None)[0]
        assert np.array_equal(quantise(a, step).data, linear.coefficients[0].data) == same


@pytest.mark.parametrize("config, field", [
    (DCT(step=0.0), "step"), (DCT(step=-0.5), "step"), (DCT(step=float("nan")), "step"),
    (DCT(step=float("inf")), "step"), (DCT(step=1e-30), "step"), (DCT(step=1.0, rel_step=0.1), "rel_step"),
    (DCT(rel_step=-1.0), "rel_step"), (Series(step="0.1"), "step"), (Dense(step=0.1, dtype="float16"), "step"),
])
def test_an_encoder_refuses_a_bad_step_naming_the_tensor(config: Any, field: str, tmp_path: Path) -> None:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.save({"w": weights()}, tmp_path / "q.kpk", forms={"w": config})
    assert (caught.value.tensor, caught.value.field) == ("w", field)


def test_dense_quantisation_is_for_float32_tensors_only(tmp_path: Path) -> None:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.save({"w": weights().astype(np.float16)}, tmp_path / "q.kpk", forms={"w": Dense(step=0.1)})
    assert (caught.value.tensor, caught.value.field) == ("w", "step")


# --- readers: bad steps, versions -------------------------------------------------------
edited = RawFile.edit


def refused(path: Path) -> kernelpack.KernelpackError:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.open(path)
    assert caught.value.path == str(path)
    return caught.value


def set_step(value: Any, array: str = "coefficients") -> Any:
    return lambda header: header["tensors"]["w"]["arrays"][array].update(step=value)


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf"), float("-inf"), 0.1, 1e-50, 1,
                                   True, "0.5", None, 2.0 ** 125],
                         ids=["zero", "negative", "nan", "inf", "-inf", "not-float32", "underflow", "int",
                              "bool", "str", "nil", "overflowing-codes"])
def test_a_reader_refuses_a_bad_step_naming_tensor_and_field(value: Any, tmp_path: Path) -> None:
    path = edited(packed(tmp_path / "q.kpk", DCT(keep=0.4, step=0.01)), set_step(value))
    error = refused(path)
    assert (error.tensor, error.field) == ("w", "arrays.coefficients.step")


def test_a_step_on_float_numbers_is_refused(tmp_path: Path) -> None:
    error = refused(edited(packed(tmp_path / "q.kpk", DCT(keep=0.4)), set_step(0.5)))
    assert (error.tensor, error.field) == ("w", "arrays.coefficients.step")


def test_a_step_on_an_index_is_refused(tmp_path: Path) -> None:
    """uint8 (not a code dtype) and int16 (codes, but an index is no array of numbers)."""
    error = refused(edited(packed(tmp_path / "q.kpk", Basis(bank=4, step=0.01)), set_step(1.0, "index")))
    assert (error.tensor, error.field) == ("w", "arrays.index.step")
    index = Stored(np.array([0, 0], np.uint16), "uint16")
    tensor = BasisTensor((2, 2, 2), "bank", to_stored(np.ones((1, 2, 2)), "float16"), index,
                         *(to_stored(np.ones(2), "float16"),) * 2)
    path = tmp_path / "index.kpk"
    kernelpack.save({"w": tensor}, path, compact=False)

    def int16_index(header: dict) -> None:
        header["tensors"]["w"]["arrays"]["index"].update(dtype="int16", step=1.0)
    error = refused(edited(path, int16_index, minor=2))
    assert (error.tensor, error.field, error.reason) == ("w", "arrays.index.step", "only arrays of numbers may be quantised")


def test_a_step_on_an_attachment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "att.kpk"
    kernelpack.save({"w": weights()}, path, attachments={"blob": b"bytes"}, compact=False)
    error = refused(edited(path, lambda h: h["attachments"]["blob"].update(step=1.0), minor=2))
    assert (error.tensor, error.field) == (None, "attachments.blob.step")


def test_a_quantised_dense_tensor_decodes_to_float32_only(tmp_path: Path) -> None:
    error = refused(edited(packed(tmp_path / "q.kpk", Dense(step=0.01)),
                           lambda h: h["tensors"]["w"].update(dtype="int16")))
    assert (error.tensor, error.field) == ("w", "dtype")


@pytest.mark.parametrize("config, field", [
    (DCT(keep=0.4, step=0.01), "arrays.coefficients.dtype"), (Series(step=0.01), "arrays.coefficients.dtype"),
    (Basis(bank=4, step=0.01), "banks.*.dtype"), (Linear(step=0.01), "arrays.primaries.dtype"),
    (Dense(step=0.01), "dtype")], ids=["dct", "series", "basis", "linear", "dense"])
def test_a_reader_that_ignores_step_refuses_the_file_rather_than_misread_it(
        config: Any, field: str, tmp_path: Path) -> None:
    """What a 1.1 reader sees of a 1.2 file: a newer minor version, so the unknown key ``step``
    is ignored, and then integer codes where the form wants float numbers (or, for dense, an
    int tensor that claims to be float32): refused, for every form."""
    def without_steps(header: dict) -> None:
        for ref in [*header["banks"].values(), *header["tensors"]["w"]["arrays"].values()]:
            ref.pop("step", None)
    error = refused(edited(packed(tmp_path / "q.kpk", config), without_steps, minor=0xFFFF))
    assert error.tensor == "w" and (error.field == field or field == "banks.*.dtype" and
                                    error.field.startswith("banks.") and error.field.endswith(".dtype"))


def test_a_reader_of_version_1_1_refuses_a_quantised_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, with this reader's code made a 1.1 reader: it does not know ``step``."""
    path = packed(tmp_path / "q.kpk", DCT(keep=0.4, step=0.01))
    monkeypatch.setattr(kernelpack.reader, "VERSION", (1, 1))
    monkeypatch.setattr(kernelpack.reader, "ADDED_ARRAY_KEYS", {})
    error = refused(path)
    assert (error.tensor, error.field) == ("w", "arrays.coefficients.dtype")


def test_step_in_a_file_of_an_older_minor_version_is_an_unknown_field(tmp_path: Path) -> None:
    path = edited(packed(tmp_path / "q.kpk", DCT(keep=0.4, step=0.01)), lambda h: None, minor=1)
    error = refused(path)
    assert (error.tensor, error.field) == ("w", "arrays.coefficients.step") and "version 1.1" in error.reason


def test_the_writer_refuses_what_a_reader_would(tmp_path: Path) -> None:
    bad = DCTTensor((4,), (0,), Stored(np.array([1, 2], np.int8), "int8", 0.1))  # 0.1: not a float32
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.save({"w": bad}, tmp_path / "q.kpk")
    assert (caught.value.tensor, caught.value.field) == ("w", "arrays.coefficients.step")


# --- training ----------------------------------------------------------------------------
TRAINED = {"dct": DCT(keep=0.3, step=2.0 ** -9), "series": Series(harmonics=2, rel_step=0.01),
           "basis": Basis(bank=4, rel_step=0.01), "linear": Linear(alpha=0.5, rank=2, step=0.001),
           "dense": Dense(rel_step=0.02)}


@pytest.mark.parametrize("form", TRAINED)
def test_training_uses_and_packs_exactly_the_quantised_numbers(form: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from kernelpack.converters import compress_, fine_tune
    from kernelpack.converters._common import fields, form_weights

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 5))
    compress_(net, {"0": TRAINED[form]})
    g = torch.Generator().manual_seed(0)
    fine_tune(net, torch.randn(32, 3, 4, 4, generator=g), torch.randint(0, 5, (32,), generator=g),
              epochs=1, lr=1e-2, batch_size=16, progress=False)
    plist = form_weights(net)["0.weight"]
    expected = plist[0].to_encoded(*fields(plist))
    path = tmp_path / "net.kpk"
    kernelpack.save(net, path)
    with kernelpack.open(path) as c:
        got = c.encoded("0.weight")
        for key, stored in expected.arrays().items():
            assert (got.arrays()[key].dtype, got.arrays()[key].step) == (stored.dtype, stored.step), key
            assert np.array_equal(got.arrays()[key].data, stored.data), key
        assert any(s.step is not None for s in got.arrays().values())
        decoded = c.get_numpy("0.weight")
    with torch.no_grad():  # the layer computes with the stored numbers (decode: fixed point)
        np.testing.assert_allclose(decoded, net[0].weight.numpy(), rtol=0, atol=2e-6)


def test_the_forward_quantises_exactly_as_the_packer() -> None:
    torch = pytest.importorskip("torch")
    from kernelpack.converters._common import as_stored, stored

    x = torch.from_numpy(random_array(3, (1000,))).requires_grad_()
    forward = as_stored(x, "float16", 0.01)
    assert torch.equal(forward.detach(), torch.from_numpy(stored(x, "float16", 0.01).values()))
    forward.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through


def test_cli_form_rules_take_a_step() -> None:
    from kernelpack.cli import parse_form

    assert parse_form("*.weight=dct:keep=0.3,rel_step=0.01") == Rule("*.weight", DCT(keep=0.3, rel_step=0.01))
    assert parse_form("*.bias=dense:step=0.5") == Rule("*.bias", Dense(step=0.5))


def test_the_example_of_the_spec(tmp_path: Path) -> None:
    """spec/FORMAT.md 3.1: section 9's tensor with DCT(boundary=4, step=0.125)."""
    path = packed(tmp_path / "q.kpk", DCT(boundary=4, step=0.125), np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    assert path.stat().st_size == 324
    with Container(path) as c:
        coefficients = c.encoded("w").arrays()["coefficients"]
        assert (coefficients.dtype, coefficients.step, coefficients.data.tolist()) == ("int8", 0.125, [69, -16, -29, 0])
        assert c.info("w").digest.hex() == "ba5f74d5da193f26449eb80f5ea978121cf96c5f00b3d9bf3286236df581aeae"
        assert c.get_numpy("w").view(np.uint32).ravel().tolist() == [
            0x3F854766, 0x4002A3B3, 0x4042A3B3, 0x40800888, 0x40A00888, 0x40C00888]
