"""Dependent quantisation (``dq_step``, format 1.7, spec/FORMAT.md section 3.2; kernelpack/dq.py):
the decode is the state machine of the spec, written here a second time as the spec says it
(VVC's next-state table); the numpy and compiled encoders choose the same codes; at the
weight error of uniform codes dq files are smaller; the file is 1.7 only when dq is used;
a 1.6 reader refuses it rather than misread it; every bad use is refused naming tensor and
field."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kernelpack
from conftest import RawFile
from kernelpack import DCT, Basis, Dense, Linear, Series, dq
from kernelpack._backend import get_ops
from kernelpack.forms._base import quantise
from kernelpack.cli import parse_form
from kernelpack.rules import config_from_dict, config_to_dict

#: spec/FORMAT.md 3.2: the next state by (state 2g + l, parity of the code).
NEXT = [[0, 2], [2, 0], [1, 3], [3, 1]]


def spec_levels(codes: np.ndarray) -> np.ndarray:
    """The levels by the state table, element by element, as the spec words it."""
    shape = codes.shape
    rows = shape[0] if codes.ndim >= 2 else 1
    out = np.zeros(codes.size, dtype=np.int64)
    flat = codes.reshape(rows, -1)
    for r in range(rows):
        state = 0
        for t, q in enumerate(flat[r].tolist()):
            out[r * flat.shape[1] + t] = 2 * q - (state >> 1) * int(np.sign(q))
            state = NEXT[state][q & 1]
    return out.reshape(shape)


def laplace(seed: int = 0, shape: tuple[int, ...] = (32, 16, 3, 3), scale: float = 0.03) -> np.ndarray:
    return np.random.default_rng(seed).laplace(0, scale, shape).astype(np.float32)


def test_the_spec_example() -> None:
    q = np.array([1, 1, 2, -1, 3], np.int8)
    assert dq.grids(q, 1).tolist() == [0, 1, 1, 1, 0]
    assert dq.levels(q).tolist() == [2, 1, 3, -1, 6]


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (2, 1), (3, 8), (5, 4, 3, 3), (1, 1000)])
def test_levels_follow_the_state_table(shape: tuple[int, ...]) -> None:
    codes = np.random.default_rng(sum(shape)).integers(-128, 128, shape).astype(np.int8)
    assert np.array_equal(dq.levels(codes), spec_levels(codes))
    wide = (codes.astype(np.int16) * 257)  # int16 codes, both parities, the extremes included
    wide.reshape(-1)[:2] = [-32768, 32767][:wide.size] if wide.size >= 2 else wide.reshape(-1)[:2]
    assert np.array_equal(dq.levels(wide), spec_levels(wide))


@pytest.mark.parametrize("step", [0.375, float(2.0 ** -149), float(2.0 ** 111), float(np.float32(0.1))])
def test_the_compiled_and_numpy_decodes_give_the_same_bits(step: float, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    codes = np.random.default_rng(7).integers(-32768, 32768, (6, 501)).astype(np.int16)
    compiled = dq.dequantise(codes, step)
    monkeypatch.setattr(dq, "_jit", lambda: None)
    numpy = dq.dequantise(codes, step)
    assert numpy.dtype == compiled.dtype == np.float32 and numpy.tobytes() == compiled.tobytes()
    assert numpy.tobytes() == (spec_levels(codes).astype(np.float32) * np.float32(step)).tobytes()


def test_every_row_restarts_the_state_machine() -> None:
    row = np.array([3, -1, 2, 5, -7, 0, 1], np.int8)
    assert np.array_equal(dq.levels(np.stack([row] * 4)), np.stack([dq.levels(row)] * 4))


@pytest.mark.parametrize("lam", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(7, 33), (1, 300), (200,), (9, 2, 3, 3), (4, 1)])
def test_the_numpy_and_compiled_searches_choose_the_same_codes(shape: tuple[int, ...], lam: float,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    x = np.random.default_rng(len(shape)).laplace(0, 6, shape)
    compiled = dq.choose(x, lam)
    monkeypatch.setattr(dq, "_jit", lambda: None)
    assert np.array_equal(dq.choose(x, lam), compiled)


def test_the_search_beats_uniform_codes_of_the_same_spacing() -> None:
    """Every grid's levels are two steps apart; the trellis's error is well below that of
    uniform codes at twice the step (about 0.25 against 0.33 squared steps on a Laplacian)."""
    x = np.random.default_rng(1).laplace(0, 8, (64, 256))
    levels = dq.levels(dq.choose(x))
    assert np.mean((x - levels) ** 2) < 0.8 * np.mean((x - 2 * np.rint(x / 2)) ** 2)


def test_a_dq_file_is_smaller_at_the_weight_error_of_uniform_codes(tmp_path: Path) -> None:
    w = laplace(2, (64, 32, 3, 3))
    uniform = tmp_path / "u.kpk"
    kernelpack.save({"w": w}, uniform, forms={"w": Dense(step=0.01)}, codecs=("rans-ctx",))
    error = np.linalg.norm(kernelpack.load_numpy(uniform)["w"] - w)
    step = 0.01 * 0.55
    dependent = tmp_path / "d.kpk"
    kernelpack.save({"w": w}, dependent, forms={"w": Dense(step=step, dq=True)}, codecs=("rans-ctx",))
    got = kernelpack.load_numpy(dependent)["w"]
    assert np.linalg.norm(got - w) <= error
    assert dependent.stat().st_size < 0.99 * uniform.stat().st_size
    with kernelpack.open(dependent) as c:
        assert c.version == (1, 7) and c.info("w").arrays["data"].spec.dq
        assert all(c.verify().values())


@pytest.mark.parametrize("config", [
    DCT(keep=0.3, step=0.004, dq=True), Series(rel_step=0.01, dq=True), Basis(bank=4, rel_step=0.02, dq=True),
    Linear(alpha=0.5, step=0.004, dq=True), Linear(primaries=4, rank=2, rel_step=0.01, dq=True),
    Dense(step=0.002, dq=True, rd=0.2)], ids=["dct", "series", "basis", "linear", "linear-low-rank", "dense-rd"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_every_form_round_trips_to_the_same_bits(config: Any, backend: str, tmp_path: Path) -> None:
    w = laplace(3, (12, 6, 3, 3))
    path = tmp_path / "f.kpk"
    kernelpack.save({"w": w}, path, forms={"w": config})
    with kernelpack.open(path) as c:
        assert c.version == (1, 7)
        ops = get_ops(backend)
        assert c.verify()["w"] is True
        decoded = ops.to_numpy(c.decode("w", ops))
    assert np.array_equal(decoded, kernelpack.load_numpy(path)["w"])
    kernelpack.save({"w": w}, tmp_path / "u.kpk", forms={"w": replace(config, dq=False, rd=None)})
    uniform = kernelpack.load_numpy(tmp_path / "u.kpk")["w"]  # dq's levels: twice as far apart per grid
    assert np.linalg.norm(decoded - w) <= 2 * np.linalg.norm(uniform - w)


def test_without_dq_the_file_stays_older(tmp_path: Path) -> None:
    kernelpack.save({"w": laplace()}, tmp_path / "a.kpk", forms={"w": Dense(step=0.01)})
    with kernelpack.open(tmp_path / "a.kpk") as c:
        assert c.version < (1, 7)


def test_the_config_round_trips_and_parses_from_the_command_line() -> None:
    config = Dense(step=0.01, dq=True)
    assert config_to_dict(config) == {"form": "dense", "step": 0.01, "dq": True}
    assert config_from_dict(config_to_dict(config)) == config
    assert parse_form("*=dense:step=0.01,dq=true").config == config


@pytest.mark.parametrize("config, field", [
    (Dense(dq=True), "dq"), (Dense(step=0.01, dq=1), "dq"), (Dense(dtype="float16", dq=True), "dq")])
def test_bad_settings_are_refused(config: Any, field: str, tmp_path: Path) -> None:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.save({"w": laplace()}, tmp_path / "a.kpk", forms={"w": config})
    assert (caught.value.tensor, caught.value.field) == ("w", field)
    assert not (tmp_path / "a.kpk").exists()


def test_a_step_too_small_is_refused() -> None:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        quantise(np.array([1.0, -1.0]), 1e-6, dependent=True)
    assert caught.value.field == "step" and "int16" in caught.value.reason


def test_error_feedback_and_training_refuse_dq(tmp_path: Path) -> None:
    w = laplace(4, (8, 4, 3, 3))
    with pytest.raises(kernelpack.KernelpackError) as caught:
        Dense(step=0.01, dq=True).encode(w, "float32", hessian=np.eye(36))
    assert caught.value.field == "dq"
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.compress_(model, {"0": Dense(step=0.01, dq=True)})
    assert caught.value.field == "dq"


# --- the header ----------------------------------------------------------------------------
edited = RawFile.edit


def written(tmp_path: Path) -> Path:
    path = tmp_path / "d.kpk"
    kernelpack.save({"w": laplace(5, (4, 3, 3))}, path, forms={"w": Dense(step=0.004, dq=True)},
                    codecs=("none",), compact=False)
    return path


def refused(path: Path) -> kernelpack.KernelpackError:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        with kernelpack.open(path) as c:
            c.get_numpy("w")
    return caught.value


def ref_of(header: dict) -> dict:
    return header["tensors"]["w"]["arrays"]["data"]


@pytest.mark.parametrize("change, field, words", [
    (lambda r: r.update(step=r["dq_step"]), "arrays.data.dq_step", "not both"),
    (lambda r: r.update(dq_step=float(2.0 ** 120)), "arrays.data.dq_step", "level -256 overflows float32"),
    (lambda r: r.update(dq_step=0.1), "arrays.data.dq_step", "exactly representable as float32"),
    (lambda r: r.update(dq_step=1), "arrays.data.dq_step", "must be a float"),
    (lambda r: r.update(dq_step=-0.5), "arrays.data.dq_step", "finite and > 0")])
def test_a_reader_refuses_a_bad_dq_step(change: Any, field: str, words: str, tmp_path: Path) -> None:
    error = refused(edited(written(tmp_path), lambda h: change(ref_of(h))))
    assert (error.tensor, error.field) == ("w", field) and words in error.reason


def test_dq_step_in_a_file_of_version_1_6_is_an_unknown_field(tmp_path: Path) -> None:
    error = refused(edited(written(tmp_path), lambda h: None, minor=6))
    assert (error.tensor, error.field) == ("w", "arrays.data.dq_step") and "version 1.6" in error.reason


def test_a_reader_of_version_1_6_refuses_a_dq_file_rather_than_misread_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This reader made a 1.6 one: ``dq_step`` is an unknown key of a newer minor, ignored, and
    then int8 codes without a step in a float32 tensor: refused, never read as q x step."""
    path = written(tmp_path)
    monkeypatch.setattr(kernelpack.reader, "VERSION", (1, 6))
    monkeypatch.setattr(kernelpack.reader, "ADDED_ARRAY_KEYS", {2: frozenset({"step"})})
    error = refused(path)
    assert (error.tensor, error.field) == ("w", "dtype")


def test_a_plan_may_choose_dq_and_fits_it_weight_only(tmp_path: Path) -> None:
    """A dq candidate given to the planner is measured like any other; with calibration
    statistics it is fitted weight-only (a trellis and error feedback both choose codes)."""
    from kernelpack.converters.planner import fits_with_h
    w = {"w": laplace(6, (16, 8, 3, 3))}
    chosen = kernelpack.plan(w, max_error=0.05, candidates=lambda name, shape: [
        Dense(), Dense(rel_step=0.1), Dense(rel_step=0.056, dq=True)])
    assert dict(chosen)["w"] == Dense(rel_step=0.056, dq=True)  # the smaller at about the same error
    kernelpack.save(w, tmp_path / "p.kpk", forms=chosen)
    with kernelpack.open(tmp_path / "p.kpk") as c:
        assert c.version == (1, 7)
    assert not fits_with_h(Dense(step=0.01, dq=True), np.eye(72), (16, 8, 3, 3))
    assert fits_with_h(Dense(step=0.01), np.eye(72), (16, 8, 3, 3))


def test_inspect_says_the_codes_are_dq(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kernelpack.cli import main
    kernelpack.save({"w": laplace()}, tmp_path / "d.kpk", forms={"w": Dense(step=0.004, dq=True)})
    assert main(["inspect", str(tmp_path / "d.kpk")]) == 0
    out = capsys.readouterr().out
    assert "format 1.7" in out and "int8 dq" in out
