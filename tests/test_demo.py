"""The demo end to end (quick mode): every form packed, verified, decoded into a model."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from kernelpack import demo  # noqa: E402
from kernelpack.cli import main  # noqa: E402


def test_demo_quick(tmp_path, capsys):
    rows = demo.run(quick=True, out=str(tmp_path))
    printed = capsys.readouterr().out
    assert [r.label for r in rows] == list(demo.PLANS)
    base = rows[0].accuracy
    assert base > 0.5  # a few epochs already learn the digits
    assert all(r.accuracy == base for r in rows)
    by_label = {r.label: r for r in rows}
    assert by_label["dense float32"].decoded_accuracy == base  # lossless: the same model exactly
    assert by_label["dense float16"].ratio > 1.8
    assert all(r.ratio > 1.5 for r in rows if not r.label.startswith("dense"))
    assert all(0.0 <= r.decoded_accuracy <= 1.0 and r.decode_ms > 0 for r in rows)
    # the printed table: one row per form, in order; every file verified and kept in --out
    lines = printed.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("form ")))
    assert [line.split("  ")[0] for line in lines[start + 2:start + 2 + len(rows)]] == list(demo.PLANS)
    assert "every file verified" in printed
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".kpk")]) == len(rows)
    assert "original.safetensors" in os.listdir(tmp_path)


def test_demo_command_passes_options(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run", lambda quick, out: calls.append((quick, out)))
    assert main(["demo", "--quick", "--out", "somewhere"]) == 0
    assert main(["demo"]) == 0
    assert calls == [(True, "somewhere"), (False, None)]
