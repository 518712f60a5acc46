"""The command line: pack from every input type, inspect, verify (exit 0/1/2), unpack; every
failure one line ``kernelpack: error: ...`` on stderr and exit 2, never a traceback."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import RawFile

import kernelpack
from kernelpack.cli import main, parse_form
from kernelpack.errors import KernelpackError
from kernelpack.forms import DCT, Basis, Dense, Linear, Series
from kernelpack.rules import Rule

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

FORMS = ["--form", "conv*.weight=series:harmonics=3/2", "--form", "fc.weight=dct:keep=0.5"]


def state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"conv1.weight": rng.standard_normal((8, 2, 5, 5)).astype(np.float32),
            "conv1.bias": rng.standard_normal(8).astype(np.float32),
            "conv2.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
            "fc.weight": rng.standard_normal((10, 64)).astype(np.float32),
            "fc.bias": rng.standard_normal(10).astype(np.float32),
            "steps": np.array([7], dtype=np.int64)}


def write_input(folder, kind: str) -> str:
    path = os.path.join(folder, f"in.{kind}")
    if kind == "safetensors":
        safetensors_numpy.save_file(state(), path, metadata={"source": "unit test"})
    elif kind == "pt":
        torch.save({k: torch.from_numpy(v) for k, v in state().items()}, path)
    else:
        np.savez(path, **state())
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def packed(tmp_path, capsys) -> tuple[str, str]:
    src = write_input(tmp_path, "safetensors")
    out = str(tmp_path / "model.kpk")
    assert run(capsys, "pack", src, out, *FORMS)[0] == 0
    return src, out


@pytest.mark.parametrize("kind", ["safetensors", "pt", "npz"])
def test_pack_each_input_type(tmp_path, capsys, kind):
    src, out = write_input(tmp_path, kind), str(tmp_path / "m.kpk")
    code, stdout, _ = run(capsys, "pack", src, out, *FORMS, "--metadata", "note=a=b", "--level", "3")
    assert code == 0 and "6 tensors" in stdout
    with kernelpack.open(out) as c:
        forms = {name: c.info(name).form for name in c.keys()}
        assert c.metadata()["note"] == "a=b"
        assert (c.metadata().get("source") == "unit test") == (kind == "safetensors")
        assert c.info("conv2.weight").fields["harmonics"] == [3, 2]
    assert forms == {"conv1.weight": "series", "conv1.bias": "dense", "conv2.weight": "series",
                     "fc.weight": "dct", "fc.bias": "dense", "steps": "dense"}
    decoded = kernelpack.load_numpy(out)
    for name in ("conv1.bias", "fc.bias", "steps"):  # dense: bit for bit, dtype kept
        assert decoded[name].dtype == state()[name].dtype
        np.testing.assert_array_equal(decoded[name], state()[name])


def test_form_syntax():
    assert parse_form("*conv*.weight=series:harmonics=4/3,points=cgl/uniform") == Rule(
        "*conv*.weight", Series(harmonics=(4, 3), points=("cgl", "uniform")))
    assert parse_form("fc*.weight=dct:keep=0.05,axes=1/") == Rule("fc*.weight", DCT(keep=0.05, axes=(1,)))
    assert parse_form("*=linear:alpha=0.5,rank=4") == Rule("*", Linear(alpha=0.5, rank=4))
    assert parse_form("*.weight=basis:bank=16") == Rule("*.weight", Basis(bank=16))
    assert parse_form("*.bias=dense:dtype=float16") == Rule("*.bias", Dense(dtype="float16"))
    for bad in ("series", "=series", "a=", "a=zip", "a=series:harmonics", "a=series:bogus=1",
                "a=series:harmonics=3//2"):
        with pytest.raises(KernelpackError, match="bad --form"):
            parse_form(bad)


def test_config_file_and_rule_order(tmp_path, capsys):
    src = write_input(tmp_path, "npz")
    config = tmp_path / "forms.json"
    config.write_text(json.dumps({
        "default": {"form": "dense", "dtype": "float16"},
        "rules": [{"pattern": "conv*.weight", "form": "basis", "bank": 4},
                  {"pattern": "fc.weight", "form": "linear", "alpha": 0.5},
                  {"pattern": "steps", "form": "dense"}]}))
    out = str(tmp_path / "m.kpk")
    code, _, err = run(capsys, "pack", src, out, "--config", str(config),
                       "--form", "conv2.weight=series:harmonics=2", "--form", "nothing*=dct")
    assert code == 0
    assert "kernelpack: warning: rule 'nothing*' chose no tensor" in err
    with kernelpack.open(out) as c:  # --form rules first, then config rules, then the default
        forms = {name: (c.info(name).form, c.info(name).arrays["data"].spec.dtype
                        if c.info(name).form == "dense" else None) for name in c.keys()}
    assert forms == {"conv1.weight": ("basis", None), "conv2.weight": ("series", None),
                     "fc.weight": ("linear", None), "conv1.bias": ("dense", "float16"),
                     "fc.bias": ("dense", "float16"), "steps": ("dense", "int64")}
    config.write_text(json.dumps({"rules": [{"pattern": "*", "form": "series", "harmonic": 3}]}))
    code, _, err = run(capsys, "pack", src, out, "--config", str(config), "-f")
    assert code == 2 and err.startswith("kernelpack: error: ") and "rules[0]" in err


def test_inspect_with_original(packed, capsys):
    src, out = packed
    code, stdout, _ = run(capsys, "inspect", out, "--original", src, "--json")
    assert code == 0
    report = json.loads(stdout)
    rows = {t["name"]: t for t in report["tensors"]}
    decoded = kernelpack.load_numpy(out)
    for name, original in state().items():
        row = rows[name]
        assert row["ratio"] == pytest.approx(row["dense_float32_bytes"] / row["stored_bytes"])
        diff = decoded[name].astype(np.float64) - original
        assert row["max_abs_error"] == pytest.approx(np.abs(diff).max())
        rel = np.sqrt(np.mean(diff**2)) / np.sqrt(np.mean(original.astype(np.float64)**2))
        assert row["rel_rms_error"] == pytest.approx(rel)
    assert rows["fc.bias"]["max_abs_error"] == 0 and rows["conv2.weight"]["max_abs_error"] > 0
    assert rows["conv2.weight"]["settings"] == "family=cosine harmonics=3/2 points=cgl/cgl float16"
    totals = report["totals"]
    assert totals["file_bytes"] == os.path.getsize(out)
    assert totals["ratio"] == pytest.approx(totals["dense_float32_bytes"] / totals["file_bytes"])
    assert report["metadata"] == {"source": "unit test"}
    code, stdout, _ = run(capsys, "inspect", out, "--original", src)
    assert code == 0 and "rel rms err" in stdout and "conv2.weight" in stdout
    assert f"file {totals['file_bytes']} bytes" in stdout


def test_inspect_lists_banks(tmp_path, capsys):
    src, out = write_input(tmp_path, "npz"), str(tmp_path / "b.kpk")
    assert run(capsys, "pack", src, out, "--form", "conv*.weight=basis:bank=4")[0] == 0
    code, stdout, _ = run(capsys, "inspect", out)
    assert code == 0 and stdout.count("\nbank bank-") == 2 and "4x5x5 float16" in stdout


def test_verify_ok(packed, capsys):
    code, stdout, _ = run(capsys, "verify", packed[1])
    assert (code, stdout) == (0, "")  # only failures are printed
    code, stdout, _ = run(capsys, "verify", packed[1], packed[1], "-v", "--backend", "torch")
    assert code == 0 and stdout.count("OK ") == 12
    assert stdout.count("all 6 tensors decode to their digest (torch on cpu)") == 2


def test_verify_reports_every_corrupted_tensor_and_goes_on_exit_1(packed, capsys):
    out = packed[1]
    data = bytearray(open(out, "rb").read())
    data[-1] ^= 0xFF  # the last payload's last byte
    open(out, "wb").write(bytes(data))
    code, stdout, err = run(capsys, "verify", out, "-v")
    assert code == 1 and err == ""
    bad = [line for line in stdout.splitlines() if line.startswith("CORRUPT")]
    # the six payloads are small, so they share one hash group (format 1.6): all six are reported
    assert len(bad) == 6 and all("checksum mismatch" in line and "hash group" in line for line in bad)
    assert f"{out}: 6 failure(s) (6 tensors)" in stdout
    code, stdout, _ = run(capsys, "verify", out, "--json")
    report = json.loads(stdout)["files"][0]
    assert code == 1 and report["status"] == "CORRUPT"
    assert sorted(i["status"] for i in report["items"]) == ["CORRUPT"] * 6


def test_verify_names_the_one_corrupted_tensor_of_a_file_without_hash_groups(tmp_path, capsys):
    out = str(tmp_path / "plain.kpk")
    kernelpack.save({f"t{i}": np.full(8, i, np.float32) for i in range(6)}, out, compact=False)
    data = bytearray(open(out, "rb").read())
    data[-1] ^= 0xFF  # the last payload's last byte
    open(out, "wb").write(bytes(data))
    code, stdout, _ = run(capsys, "verify", out, "-v")
    bad = [line for line in stdout.splitlines() if line.startswith("CORRUPT")]
    assert code == 1 and len(bad) == 1 and "t5" in bad[0] and stdout.count("OK ") == 5


def test_verify_digest_mismatch_exit_1_and_a_missing_file_exit_2(packed, tmp_path, capsys):
    out = packed[1]
    raw = RawFile.read(out)  # flip one bit of a recorded digest; the header checksum is re-sealed
    entry = raw.header["tensors"]["conv2.weight"]
    entry["digest"] = bytes([entry["digest"][0] ^ 1]) + entry["digest"][1:]
    raw.write(out)
    code, stdout, _ = run(capsys, "verify", out)
    assert code == 1
    assert f"MISMATCH  {out}: conv2.weight" in stdout and "fc.weight" not in stdout
    assert "1 failure(s) (6 tensors)" in stdout
    missing = str(tmp_path / "missing.kpk")
    code, stdout, err = run(capsys, "verify", out, missing)
    assert code == 2 and "MISMATCH" in stdout and err.startswith("kernelpack: error: ") and missing in err


def test_pack_refuses_to_overwrite_without_f_and_names_out_by_default(tmp_path, capsys):
    src = write_input(tmp_path, "npz")
    default = str(tmp_path / "in.kpk")
    assert run(capsys, "pack", src)[0] == 0 and os.path.exists(default)
    before = open(default, "rb").read()
    code, _, err = run(capsys, "pack", src, "-o", default, "--form", "*=dense:dtype=float16")
    assert_one_error_line(code, err, "already exists; give -f to overwrite it")
    assert open(default, "rb").read() == before
    code, stdout, err = run(capsys, "pack", src, "-o", default, "-f", "-q", "--form", "*.weight=dense:dtype=float16")
    assert code == 0 and stdout == "" and err.startswith("kernelpack: warning: ") and "is lossy: 3 of 6" in err
    code, stdout, _ = run(capsys, "pack", src, default, "-f", "--json")
    report = json.loads(stdout)
    assert code == 0 and report["lossless"] and report["file_bytes"] == os.path.getsize(default)
    assert_one_error_line(*run(capsys, "pack", src, default, "-o", default)[::2], "give OUT once")


def test_version_and_unpack_refuses_an_output_type_it_does_not_write(packed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"kernelpack {kernelpack.__version__} (format 1.7)\n"
    out = tmp_path / "o.npz"
    code, _, err = run(capsys, "unpack", packed[1], str(out))
    assert_one_error_line(code, err, "unpack writes .safetensors")
    assert not out.exists()


@pytest.mark.parametrize("command", ["inspect", "verify", "unpack"])
def test_bad_file_exit_2(tmp_path, capsys, command):
    bad = tmp_path / "bad.kpk"
    bad.write_bytes(b"not a container at all, just some bytes" * 3)
    extra = [str(tmp_path / "o.safetensors")] if command == "unpack" else []
    code, _, err = run(capsys, command, str(bad), *extra)
    assert code == 2 and err == f"kernelpack: error: file '{bad}', field 'magic': " \
                                "not a kernelpack container (bad magic)\n"


def test_bad_inputs_exit_2(tmp_path, capsys):
    class_pickle = tmp_path / "obj.pt"  # weights_only=True refuses arbitrary objects
    torch.save({"w": torch.zeros(2), "when": __import__("datetime").date(2020, 1, 1)}, class_pickle)
    obj_npz = tmp_path / "obj.npz"
    np.savez(obj_npz, a=np.array([{"x": 1}], dtype=object))
    for src, needle in [(class_pickle, "cannot read as .pt"), (obj_npz, "cannot read as .npz"),
                        (tmp_path / "x.tflite", "unknown input type '.tflite'"),
                        (tmp_path / "missing.npz", "no such file")]:
        code, _, err = run(capsys, "pack", str(src), str(tmp_path / "o.kpk"))
        assert code == 2 and err.startswith("kernelpack: error: ") and needle in err
    assert not (tmp_path / "o.kpk").exists()
    src = write_input(tmp_path, "npz")
    code, _, err = run(capsys, "pack", src, str(tmp_path / "o.kpk"), "--form", "conv1.bias=linear")
    assert code == 2 and "tensor 'conv1.bias'" in err  # linear needs filters, not a bias


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_verify_cuda_without_cuda(packed, capsys):
    code, _, err = run(capsys, "verify", packed[1], "--device", "cuda")
    assert code == 2 and err == ("kernelpack: error: field 'device': 'cuda': torch sees no CUDA device "
                                 "on this machine\n")
    code, _, err = run(capsys, "verify", packed[1], "--device", "cuda", "--backend", "numpy")
    assert code == 2 and "numpy backend decodes on the CPU only" in err


def test_unpack_round_trip(packed, tmp_path, capsys):
    out = packed[1]
    dense = str(tmp_path / "dense.safetensors")
    assert run(capsys, "unpack", out, dense)[0] == 0
    expected = kernelpack.load_numpy(out)
    got = safetensors_numpy.load_file(dense)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes()
    with open(dense, "rb") as f:  # metadata travels: packed from .safetensors, back out
        (n,) = struct.unpack("<Q", f.read(8))
        assert json.loads(f.read(n))["__metadata__"] == {"source": "unit test"}


def test_bfloat16_round_trip(tmp_path, capsys):
    """bfloat16 tensors go in through safetensors (torch), out bit for bit as bfloat16."""
    from safetensors.torch import load_file, save_file

    weights = {"w": torch.randn(4, 3, 3, 3).to(torch.bfloat16), "b": torch.randn(4).to(torch.bfloat16)}
    src, out, dense = (str(tmp_path / n) for n in ("bf.safetensors", "bf.kpk", "bf2.safetensors"))
    save_file(weights, src)
    assert run(capsys, "pack", src, out, "--form", "w=series:harmonics=2")[0] == 0
    assert run(capsys, "unpack", out, dense)[0] == 0
    got = load_file(dense)
    assert got["b"].dtype == torch.bfloat16 and torch.equal(got["b"], weights["b"])
    assert got["w"].dtype == torch.float32  # compressed forms decode to float32
    assert torch.equal(got["w"], torch.from_numpy(kernelpack.load_numpy(out)["w"]))


def test_python_dash_m(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kernelpack", "pack", "--help"],
                            capture_output=True, text=True, check=True)
    assert "PATTERN=FORM[:KEY=VALUE,...]" in result.stdout and "harmonics=4/3" in result.stdout


# --- the error contract: one line, exit 2, nothing written ------------------------------
def assert_one_error_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert err.startswith("kernelpack: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and needle in err, err


def fail_with(code: int):
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))
    return fail


def folder_in(folder, name: str) -> str:
    (folder / name).mkdir()
    return str(folder / name)


#: (id, how OUT is made unwritable, given the test folder: returns OUT; what the line says)
BAD_OUTPUTS = [
    ("a-folder", lambda d, mp: folder_in(d, "out"), "is a folder"),
    ("parent-missing", lambda d, mp: str(d / "missing" / "o.kpk"), "does not exist"),
    ("name-too-long", lambda d, mp: str(d / ("a" * (os.pathconf(d, "PC_NAME_MAX") + 1))), "File name too long"),
    ("read-only-folder", lambda d, mp: mp.setattr("tempfile.mkstemp", fail_with(errno.EROFS)) or str(d / "o.kpk"),
     "cannot write: Read-only file system"),
    ("no-permission", lambda d, mp: mp.setattr("tempfile.mkstemp", fail_with(errno.EACCES)) or str(d / "o.kpk"),
     "cannot write: Permission denied"),
    ("disk-full", lambda d, mp: mp.setattr("os.fsync", fail_with(errno.ENOSPC)) or str(d / "o.kpk"),
     "cannot write: No space left on device"),
]


@pytest.mark.parametrize("command", ["pack", "unpack"])
@pytest.mark.parametrize("make_out, needle", [c[1:] for c in BAD_OUTPUTS], ids=[c[0] for c in BAD_OUTPUTS])
def test_an_unwritable_output_is_one_error_line(packed, tmp_path, capsys, monkeypatch, command, make_out, needle):
    src = packed[0] if command == "pack" else packed[1]
    folder = tmp_path / "outputs"
    folder.mkdir()
    out = make_out(folder, monkeypatch)
    if command == "unpack" and not os.path.isdir(out):  # an output type unpack writes
        out = out[:-len(".kpk")] + ".safetensors" if out.endswith(".kpk") else out + ".safetensors"
    before = sorted(os.listdir(folder))
    code, stdout, err = run(capsys, command, src, out)
    assert_one_error_line(code, err, needle)
    assert f"file '{out}'" in err and stdout == ""
    assert sorted(os.listdir(folder)) == before  # no partial OUT, no temporary file left


def test_any_legal_output_name_works(packed, tmp_path, capsys):
    out = tmp_path / ("a" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".kpk")
    assert run(capsys, "pack", packed[0], str(out), *FORMS)[0] == 0
    assert kernelpack.load_numpy(out).keys() == kernelpack.load_numpy(packed[1]).keys()


def same_file(folder, src: str, how: str) -> str:
    """A name for ``src`` itself: the same path, another spelling, a symbolic or a hard link."""
    if how == "same-path":
        return src
    if how == "other-spelling":
        return os.path.join(os.path.dirname(src), ".", os.path.basename(src))
    link = str(folder / f"{how}{os.path.splitext(src)[1]}")
    (os.symlink if how == "symlink" else os.link)(src, link)
    return link


@pytest.mark.parametrize("how", ["same-path", "other-spelling", "symlink", "hard-link"])
@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_out_that_is_in_is_refused_before_anything_is_written(packed, tmp_path, capsys, command, how):
    src = packed[0] if command == "pack" else packed[1]
    before = open(src, "rb").read()
    out = same_file(tmp_path, src, how)
    code, _, err = run(capsys, command, src, out)
    assert_one_error_line(code, err, f"is the input file '{src}'")
    assert open(src, "rb").read() == before and os.path.samefile(src, out)


def unreadable(path: str, monkeypatch) -> None:
    """Opening ``path`` fails as for a file without read permission (a test run as root reads
    anything, so chmod would not do)."""
    real_open, real_builtin = os.open, open

    def refuse(name, *args, **kwargs):
        if os.fspath(name) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(name, *args, **kwargs)

    def refuse_builtin(name, *args, **kwargs):
        if not isinstance(name, int) and os.fspath(name) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_builtin(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr("builtins.open", refuse_builtin)


#: (id, command line given the packed (safetensors, kpk) pair and the test folder, what it says)
BAD_INPUTS = [
    ("pack-missing", lambda s, k, d: ["pack", str(d / "missing.npz"), str(d / "o.kpk")], "no such file"),
    ("pack-folder", lambda s, k, d: ["pack", str(d), str(d / "o.kpk")], "unknown input type"),
    ("pack-folder-npz", lambda s, k, d: ["pack", folder_in(d, "x.npz"), str(d / "o.kpk")],
     "not a regular file"),
    ("unpack-missing", lambda s, k, d: ["unpack", str(d / "missing.kpk"), str(d / "o.safetensors")],
     "cannot open: No such file or directory"),
    ("unpack-folder", lambda s, k, d: ["unpack", str(d), str(d / "o.safetensors")], "not a regular file"),
    ("inspect-missing", lambda s, k, d: ["inspect", str(d / "missing.kpk")], "cannot open"),
    ("verify-missing", lambda s, k, d: ["verify", str(d / "missing.kpk")], "cannot open"),
    ("inspect-original-missing", lambda s, k, d: ["inspect", k, "--original", str(d / "missing.npz")],
     "no such file"),
    ("verify-bad-device", lambda s, k, d: ["verify", k, "--device", "banana"], "unknown device 'banana'"),
    ("verify-numpy-on-cuda", lambda s, k, d: ["verify", k, "--device", "cuda", "--backend", "numpy"],
     "numpy backend decodes on the CPU only"),
]


@pytest.mark.parametrize("argv, needle", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_a_bad_input_is_one_error_line(packed, tmp_path, capsys, argv, needle):
    folder = tmp_path / "work"
    folder.mkdir()
    code, stdout, err = run(capsys, *argv(*packed, folder))
    assert_one_error_line(code, err, needle)


@pytest.mark.parametrize("command", ["pack", "unpack", "inspect", "verify"])
def test_an_unreadable_input_is_one_error_line(packed, tmp_path, capsys, monkeypatch, command):
    src = write_input(tmp_path, "npz") if command == "pack" else packed[1]  # numpy opens it in Python
    unreadable(src, monkeypatch)
    extra = [str(tmp_path / ("o.kpk" if command == "pack" else "o.safetensors"))][:command in ("pack", "unpack")]
    code, _, err = run(capsys, command, src, *extra)
    assert_one_error_line(code, err, "Permission denied")
    assert not os.path.exists(tmp_path / "o.kpk") and not os.path.exists(tmp_path / "o.safetensors")


@pytest.mark.parametrize("argv", [["pack"], ["pack", "a.npz", "b.kpk", "--level", "99"], ["bogus"], []])
def test_a_bad_command_line_is_one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert_one_error_line(caught.value.code, capsys.readouterr().err, "(see 'kernelpack")


def test_an_unexpected_exception_is_still_one_line(packed, tmp_path, capsys, monkeypatch):
    """A kernelpack bug must not print a traceback either: one line saying what to report."""
    def bug(*args: object) -> None:
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr("kernelpack.cli.load_numpy", bug)
    code, _, err = run(capsys, "unpack", packed[1], str(tmp_path / "o.safetensors"))
    assert_one_error_line(code, err, "internal error (please report it): RuntimeError: first line second line")


@pytest.mark.parametrize("argv", [["pack", "IN.npz", "FOLDER"], ["unpack", "IN.kpk", "IN.kpk"]])
def test_the_installed_command_prints_no_traceback(packed, tmp_path, argv):
    """The same contract through ``python -m kernelpack``, stderr as a user sees it."""
    src = write_input(tmp_path, "npz")
    names = {"IN.npz": src, "FOLDER": str(tmp_path), "IN.kpk": packed[1]}
    result = subprocess.run([sys.executable, "-m", "kernelpack", *[names.get(a, a) for a in argv]],
                            capture_output=True, text=True)
    assert_one_error_line(result.returncode, result.stderr, "kernelpack: error: ")


# --- honest by default, planned on request (issue 12) --------------------------------------------
@pytest.mark.parametrize("kind", ["npz", "onnx"])
def test_pack_without_a_budget_or_rule_is_lossless(tmp_path, capsys, kind):
    from test_plan import DigitsNet, onnx_bytes

    if kind == "onnx":
        src = tmp_path / "m.onnx"
        src.write_bytes(onnx_bytes(DigitsNet()))
        from kernelpack.onnx_io import read_model, take_out

        original = take_out(read_model(str(src)))[1]
    else:
        src = write_input(str(tmp_path), "npz")
        original = state()
    assert main(["pack", str(src), str(tmp_path / "o.kpk")]) == 0
    assert "lossless: every tensor decodes to its input bits" in capsys.readouterr().out
    for name, value in kernelpack.load_numpy(tmp_path / "o.kpk").items():
        assert value.dtype == original[name].dtype and value.tobytes() == original[name].tobytes()


def test_a_calibrated_onnx_pack_says_what_is_lossy_and_writes_its_plan(tmp_path, capsys):
    from test_plan import DigitsNet, onnx_bytes

    torch.manual_seed(0)
    src = tmp_path / "m.onnx"
    src.write_bytes(onnx_bytes(DigitsNet()))
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32))
    assert main(["pack", str(src), str(tmp_path / "o.kpk"), "--calibration", str(tmp_path / "cal.npz"),
                 "--max-output-error", "0.05", "--plan-out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "LOSSY" in out and "c2.weight" in out and "worst weight error" in out
    measured = float(out.split("output error on the calibration inputs: ")[1].split()[0])
    assert measured <= 0.05
    # the plan file is a --config that gives the same forms
    assert main(["pack", str(src), str(tmp_path / "again.kpk"), "--config", str(tmp_path / "plan.json")]) == 0
    assert "not measured" in capsys.readouterr().out
    with kernelpack.open(tmp_path / "o.kpk") as a, kernelpack.open(tmp_path / "again.kpk") as b:
        assert [a.info(n).form for n in a.keys()] == [b.info(n).form for n in a.keys()]


def test_max_error_and_max_bytes_plan_a_state_dict(tmp_path, capsys):
    src = write_input(str(tmp_path), "npz")
    assert main(["pack", src, str(tmp_path / "e.kpk"), "--max-error", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "LOSSY" in out and "not measured" in out
    worst = float(out.split("worst weight error (relative RMS) ")[1].split()[0])
    assert worst <= 0.05
    assert main(["pack", src, str(tmp_path / "b.kpk"), "--max-bytes", "10"]) == 2
    assert "max_bytes=10 is below the smallest plan" in capsys.readouterr().err
