"""The ``kernelpack`` command line: pack, inspect, verify, unpack, demo, serve, triton-config.

Imports stay light (numpy, msgpack): torch loads only to read .pt files, to write
bfloat16 tensors, to decode with the torch backend, and for the demo. Every
``KernelpackError`` (a bad file, a bad argument) ends the command with one line
``kernelpack: error: <message>`` on stderr and exit status 2; ``verify`` exits 1
when a tensor does not decode to its recorded digest or some bytes of the file changed
(it checks every FILE and every tensor, whatever fails first). So do a bad command line (argparse's
errors, in the same one-line form) and any other exception, which would be a kernelpack
bug: a command never ends in a traceback. A command that writes OUT checks it first (a
file name in a folder that exists, not IN itself, not an existing file unless -f) and writes
it atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any, Callable, Mapping, NoReturn, Sequence

import numpy as np

from kernelpack._backend import bfloat16_bits_to_float32, get_ops
from kernelpack._table import format_table
from kernelpack.codecs import DEFAULT_LEVEL
from kernelpack.errors import KernelpackError, need_module
from kernelpack.files import atomic_write, need_output
from kernelpack.forms import FORMS
from kernelpack.pack import as_numpy, save
from kernelpack.reader import Container, TensorInfo
from kernelpack.rules import Rule, Rules, configs_for, read_rules, rule_from_dict
from kernelpack.runtime import load, load_numpy

FORM_SYNTAX = """\
form rules (--form, repeatable):
  PATTERN=FORM[:KEY=VALUE,...]
  PATTERN is a tensor name ('conv1.weight'), a module name (a tensor name without its
  last '.'-part: 'conv1') or an fnmatch pattern on either ('*conv*', 'fc*.weight', '*').
  FORM is dense, dct, series, basis or linear; KEY=VALUE are that form's settings, or
  the selectors min_rank=N (tensors of rank >= N only) and floating=true|false.
  A VALUE is an int, a float, true, false, a word, or a list written with '/':
  harmonics=4/3 is (4, 3), points=cgl/uniform; a list of one ends with '/': axes=1/.
  Examples:
    --form '*conv*.weight=series:harmonics=3'
    --form 'conv2.weight=series:harmonics=4/3,points=cgl/uniform,dtype=bfloat16'
    --form 'fc*.weight=dct:keep=0.05'       (or boundary=N, axes=0/1)
    --form '*conv*.weight=basis:bank=16'
    --form '*.weight=linear:alpha=0.5,rank=4'
    --form '*.bias=dense:dtype=float16'
    --form '*conv*.weight=dct:keep=0.3,rel_step=0.02'   (quantised numbers: step=S
                                         absolute, rel_step=R per array's RMS; format 1.2)
    --form '*=dense:rel_step=0.01,min_rank=2,floating=true'   (every floating weight of
                                         rank >= 2; integer buffers and biases as they are)

form config (--config FILE.json), for what a command line cannot say (explicit
series points, banks given as arrays); --plan-out writes one:
  {"default": {"form": "dense", "dtype": "float16"} or null,
   "rules": [{"pattern": "*conv*.weight", "form": "series", "harmonics": [4, 3]},
             {"pattern": "*", "min_rank": 2, "floating": true, "form": "dense", "rel_step": 0.01},
             {"pattern": "head", "form": null}]}          (null: stored as it is)

Which rule applies (kernelpack.rules), for each tensor:
  1. a rule whose PATTERN is the tensor's name, character for character;
  2. else one whose PATTERN is its module's name;
  3. else the first rule whose pattern matches the tensor's or module's name: the
     --form rules in the order given, then the config's rules in order;
  4. else the config's "default", else a budget's plan, else dense (stored as it is).
A rule only takes the tensors its selectors accept. A rule that chooses no tensor is
reported as a warning.
"""


# --- form rules ---------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """One setting's value: int, float, true/false, word, or a '/'-separated list (trailing '/'
    for one)."""
    if "/" in text:
        items = text.split("/")
        if items[-1] == "":
            items.pop()
        if not items or "" in items:
            raise KernelpackError(f"bad list {text!r}: write items separated by '/', e.g. 4/3 or 1/")
        return [parse_value(item) for item in items]
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def parse_form(rule: str) -> Rule:
    """``'*conv*.weight=series:harmonics=3'`` -> ``Rule('*conv*.weight', Series(harmonics=3))``;
    the selectors are written as settings (``'*=dense:step=0.01,min_rank=2,floating=true'``)."""
    try:
        pattern, sep, form = rule.partition("=")
        if not sep or not pattern or not form:
            raise KernelpackError("expected PATTERN=FORM[:KEY=VALUE,...]")
        name, _, settings_text = form.partition(":")
        spec: dict[str, Any] = {"pattern": pattern, "form": name}
        for item in filter(None, settings_text.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key or not value or key in spec:
                raise KernelpackError(f"setting {item!r} is not KEY=VALUE" if key not in spec
                                      else f"{key} is given twice")
            spec[key] = parse_value(value)
        return rule_from_dict(spec, "--form")
    except KernelpackError as exc:
        raise KernelpackError(f"bad --form {rule!r}: {exc.reason}", field=exc.field) from None


def command_line_rules(forms: Sequence[str], config: str | None) -> Rules:
    """The --form rules in order, then the --config file's rules and its default (FORM_SYNTAX)."""
    from_file = read_rules(config) if config else Rules()
    return Rules((*map(parse_form, forms), *from_file.rules), from_file.default)


def warning(message: str) -> None:
    """A warning line on stderr, as the command line says them."""
    print(f"kernelpack: warning: {message}", file=sys.stderr)


# --- input files --------------------------------------------------------------------
def read_tensors(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors (numpy arrays or torch tensors) and metadata from .safetensors, .pt/.pth or .npz.

    Nothing is unpickled: .pt files load with ``weights_only=True``, .npz with
    ``allow_pickle=False``.
    """
    readers: dict[str, Callable[[str], tuple[dict[str, Any], dict[str, str]]]] = {
        ".safetensors": _read_safetensors, ".pt": _read_torch, ".pth": _read_torch, ".npz": _read_npz}
    ext = os.path.splitext(path)[1].lower()
    if ext not in readers:
        raise KernelpackError(f"unknown input type {ext!r}: use .safetensors, .pt, .pth or .npz "
                              "(pack also reads .onnx models)", path=path)
    if not os.path.isfile(path):
        raise KernelpackError("not a regular file" if os.path.exists(path) else "no such file", path=path)
    try:
        return readers[ext](path)
    except KernelpackError as exc:
        raise exc.located(path=path) from None
    except Exception as exc:  # each reader library raises its own types; report them as one
        raise KernelpackError(f"cannot read as {ext}: {exc}", path=path) from None


def _read_safetensors(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    safetensors = need_module("safetensors", "reading .safetensors")
    with safetensors.safe_open(path, framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        keys = list(f.keys())
        if all(f.get_slice(k).get_dtype() != "BF16" for k in keys):
            return {k: f.get_tensor(k) for k in keys}, metadata
    need_module("torch", "reading bfloat16 tensors")  # numpy has no bfloat16
    return dict(need_module("safetensors.torch", "reading .safetensors").load_file(path)), metadata


def _read_torch(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    torch = need_module("torch", "reading .pt files")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise KernelpackError(f"holds a {type(state).__name__}, not a state_dict "
                              "(save model.state_dict())")
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise KernelpackError(f"entry {key!r} is a {type(value).__name__}, not a tensor; "
                                  "a state_dict maps names to tensors")
    return dict(state), {}


def _read_npz(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise KernelpackError("is not an .npz archive")
    with archive:
        return {k: archive[k] for k in archive.files}, {}


def parse_metadata(items: Sequence[str]) -> dict[str, str]:
    metadata = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KernelpackError(f"bad --metadata {item!r}: expected KEY=VALUE")
        metadata[key] = value
    return metadata


def check_output(src: str, out: str, force: bool = False) -> None:
    """Refuse, before any work, an OUT that cannot be written, that is the input itself (also
    through a symbolic or hard link: writing it would replace the file being read), or that
    exists unless ``force`` (-f, as gzip and zstd ask)."""
    need_output(out)
    if _same_file(src, out):
        raise KernelpackError(f"is the input file '{src}'; write to another file", path=out)
    if os.path.lexists(out) and not force:
        raise KernelpackError("already exists; give -f to overwrite it", path=out)


def _same_file(src: str, out: str) -> bool:
    same = os.path.realpath(src) == os.path.realpath(out)
    try:
        same = same or os.path.samefile(src, out)
    except OSError:  # one of them does not exist: not the same file
        pass
    return same


# --- output helpers -----------------------------------------------------------------
def ratio(dense: int, stored: int) -> float | None:
    return dense / stored if stored else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def short(value: Any, nested: bool = False) -> str:
    """A header field in the --form syntax: lists joined by '/', inner lists counted."""
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} values]" if nested else "/".join(short(v, True) for v in value)
    return str(value)


def settings(info: TensorInfo) -> str:
    """A tensor's settings in one short string: fields, linear's p and r, stored number dtype
    (``int8 dq``: dependent-quantised codes, format 1.7)."""
    parts = [f"{k}={short(v)}" for k, v in sorted(info.fields.items())]
    cls = FORMS.get(info.form)
    specs = {k: r.spec for k, r in info.arrays.items()}
    parts += cls.describe(info.fields, specs) if cls is not None else []
    indices = cls.INDEX_ARRAYS if cls is not None else frozenset()
    numbers = sorted({spec.dtype + (" dq" if spec.dq else "") for k, spec in specs.items() if k not in indices})
    return " ".join(parts + ["/".join(numbers)])


def error_stats(decoded: np.ndarray, original: np.ndarray) -> tuple[float, float | None]:
    """Max abs error and relative RMS error (None when the original is all zero and they differ)."""
    diff = decoded.astype(np.float64) - original.astype(np.float64)
    if diff.size == 0:
        return 0.0, 0.0
    err, ref = math.sqrt(np.mean(diff * diff)), math.sqrt(np.mean(np.square(original, dtype=np.float64)))
    return float(np.max(np.abs(diff))), err / ref if ref else (0.0 if err == 0 else None)


# --- commands -----------------------------------------------------------------------
def cmd_pack(args: argparse.Namespace) -> int:
    """Lossless unless asked: without --form, --config, --max-error, --max-output-error or
    --max-bytes every tensor is stored exactly. A budget plans the weights (the planner's
    module doc); the summary then names every tensor that is not stored exactly, its form and
    weight error, the worst one, and the output error measured on the calibration inputs
    (with -q, one warning line on stderr instead)."""
    args.output = pack_output(args)
    check_output(args.input, args.output, args.force)
    rules = command_line_rules(args.form, args.config)
    metadata = parse_metadata(args.metadata)
    onnx_input = args.input.lower().endswith(".onnx")
    if onnx_input:
        from kernelpack.onnx_io import read_model, take_out

        _, originals = take_out(read_model(args.input))
        file_metadata: dict[str, str] = {}
    else:
        originals, file_metadata = read_tensors(args.input)
    planned = _budget_plan(args, args.input if onnx_input else originals, rules)
    forms = configs_for(rules, originals, planned, report=warning)
    if onnx_input:
        from kernelpack.onnx_io import pack_onnx

        encoded = pack_onnx(args.input, args.output, forms=forms, metadata=metadata, level=args.level)
    else:
        encoded = save(originals, args.output, forms=forms, metadata={**file_metadata, **metadata},
                       level=args.level)
    if planned is not None and args.plan_out:
        planned.to_json(args.plan_out)
    size = os.path.getsize(args.output)
    dense = sum(math.prod(t.shape) * 4 for t in encoded.values())
    forms_count: dict[str, int] = {}
    for t in encoded.values():
        forms_count[t.form] = forms_count.get(t.form, 0) + 1
    lossy = lossy_rows(encoded, originals)
    measured = None if planned is None else planned.measured
    if args.json:
        print(json.dumps({"file": args.output, "tensors": len(encoded), "forms": forms_count, "file_bytes": size,
                          "ratio_to_float32": ratio(dense, size), "lossless": not lossy,
                          "lossy_tensors": [{"name": n, "form": f, "weight_error": e} for n, f, e in lossy],
                          "output_error": measured}, indent=2))
    elif args.quiet:
        if lossy:
            worst = max((e for _, _, e in lossy if e is not None), default=None)
            warning(f"{args.output} is lossy: {len(lossy)} of {len(encoded)} tensors not stored exactly, "
                    f"worst weight error {fmt(worst, '.4g')}")
    else:
        print(f"{args.output}: {len(encoded)} tensors ({', '.join(f'{n} {f}' for f, n in forms_count.items())}), "
              f"{size} bytes, ratio to float32 {fmt(ratio(dense, size), '.2f')}")
        print(lossy_summary(lossy, len(encoded), measured))
    return 0


def pack_output(args: argparse.Namespace) -> str:
    """OUT: the positional one or -o (not both); without either, IN's name with .kpk for its suffix."""
    if args.output and args.out:
        raise KernelpackError(f"give OUT once: positionally ('{args.output}') or with -o ('{args.out}')",
                              field="output")
    out = args.output or args.out
    return out if out else os.path.splitext(args.input)[0] + ".kpk"


def _budget_plan(args: argparse.Namespace, model: Any, rules: Rules) -> Any:
    """The planner's plan for --max-output-error / --max-error / --max-bytes (None without one)."""
    if args.max_output_error is None and not args.max_error and args.max_bytes is None:
        if args.calibration:
            raise KernelpackError("--calibration is for a budget: give --max-output-error, --max-bytes or "
                                  "--max-error")
        return None
    from kernelpack.converters.calibration import load_inputs
    from kernelpack.converters.planner import plan

    if args.calibration and not isinstance(model, str):
        raise KernelpackError("--calibration needs a model to run (an .onnx model); a state dict has no graph, "
                              "so its plans are weight-only: give --max-error or --max-bytes without "
                              "--calibration", path=args.calibration)
    calibration = load_inputs(args.calibration) if args.calibration else None
    return plan(model, calibration, max_output_error=args.max_output_error, max_bytes=args.max_bytes,
                max_error=args.max_error or None, forms=rules)


def lossy_rows(encoded: Mapping[str, Any], originals: Mapping[str, Any]) -> list[tuple[str, str, float | None]]:
    """(name, form, relative RMS weight error) of every tensor that does not decode to its input bits."""
    from kernelpack._backend import NumpyOps

    rows = []
    for name, tensor in encoded.items():
        original, dtype = as_numpy(originals[name])
        decoded = np.asarray(tensor.decode(NumpyOps()))
        if decoded.dtype == original.dtype and np.array_equal(decoded.reshape(-1).view(np.uint8),
                                                              original.reshape(-1).view(np.uint8)):  # 0-d too
            continue
        ref = bfloat16_bits_to_float32(original) if dtype == "bfloat16" else original
        rows.append((name, tensor.form, error_stats(decoded, ref)[1]))
    return rows


def lossy_summary(rows: Sequence[tuple[str, str, float | None]], count: int, measured: float | None) -> str:
    """Which tensors do not decode to their input bits, their forms and weight errors, the worst,
    and the measured output error (the plan's, on the calibration inputs), or 'lossless'."""
    if not rows:
        return "lossless: every tensor decodes to its input bits"
    errors = [e for _, _, e in rows if e is not None]
    lines = [f"LOSSY: {len(rows)} of {count} tensors are not stored exactly:"]
    lines += [f"  {name}  {form}  weight error {fmt(e, '.4g')}" for name, form, e in rows]
    lines.append(f"worst weight error (relative RMS) {fmt(max(errors, default=None), '.4g')}")
    lines.append("output error on the calibration inputs: " + (
        f"{measured:.4g} (measured)" if measured is not None else "not measured (no --calibration inputs)"))
    return "\n".join(lines)


def inspect_report(path: str, original: str | None) -> dict[str, Any]:
    """Everything ``inspect`` prints, as one JSON-ready map."""
    originals = None
    if original is not None:
        originals = {}
        for name, value in read_tensors(original)[0].items():
            array, dtype = as_numpy(value)
            if dtype == "bfloat16":
                array = bfloat16_bits_to_float32(array)
            originals[name] = array
    tensors = []
    with Container(path) as c:
        for name in c.keys():
            info = c.info(name)
            row = {"name": name, "form": info.form, "shape": list(info.shape), "dtype": info.dtype,
                   "settings": settings(info), "fields": info.fields,
                   "stored_bytes": info.stored_bytes, "dense_float32_bytes": info.dense_bytes,
                   "ratio": ratio(info.dense_bytes, info.stored_bytes)}
            if originals is not None and name in originals:
                ref = originals[name]
                if tuple(ref.shape) != info.shape:
                    raise KernelpackError(f"shape {list(info.shape)} differs from the original's "
                                          f"{list(ref.shape)}", path=path, tensor=name)
                row["max_abs_error"], row["rel_rms_error"] = error_stats(c.get_numpy(name), ref)
            tensors.append(row)
        banks = [{"name": n, "shape": list(r.spec.shape), "dtype": r.spec.dtype, "stored_bytes": r.length}
                 for n, r in c.bank_info().items()]
        version, metadata = c.version, c.metadata()
    size = os.path.getsize(path)
    dense = sum(t["dense_float32_bytes"] for t in tensors)
    report = {"file": path, "format_version": f"{version[0]}.{version[1]}", "metadata": metadata,
              "tensors": tensors, "banks": banks,
              "totals": {"file_bytes": size, "dense_float32_bytes": dense, "ratio": ratio(dense, size)}}
    if originals is not None:
        report["missing_from_file"] = sorted(set(originals) - {t["name"] for t in tensors})
    return report


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_report(args.file, args.original)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    header = ["tensor", "form", "shape", "settings", "stored", "ratio"]
    if args.original:
        header += ["max abs err", "rel rms err"]
    rows = []
    for t in report["tensors"]:
        row = [t["name"], t["form"], "x".join(map(str, t["shape"])) or "scalar", t["settings"],
               str(t["stored_bytes"]), fmt(t["ratio"], ".2f")]
        if args.original:
            row += [fmt(t.get("max_abs_error"), ".3g"), fmt(t.get("rel_rms_error"), ".3g")]
        rows.append(row)
    print(f"{report['file']}: format {report['format_version']}, {len(rows)} tensors")
    for key, value in report["metadata"].items():
        print(f"  metadata {key} = {value}")
    print(format_table(header, rows, "<<<<>>>>"))
    for b in report["banks"]:
        print(f"bank {b['name']}: {'x'.join(map(str, b['shape']))} {b['dtype']}, {b['stored_bytes']} bytes")
    if report.get("missing_from_file"):
        print(f"in the original but not in the file: {', '.join(report['missing_from_file'])}")
    totals = report["totals"]
    print(f"total: file {totals['file_bytes']} bytes, dense float32 {totals['dense_float32_bytes']} "
          f"bytes, ratio {fmt(totals['ratio'], '.2f')}")
    return 0


#: verify's word for each tensor or byte range: decodes to its digest / to other bits / its
#: payload fails its checksum (or cannot be decoded) / it could not be checked (a limit).
OK, MISMATCH, CORRUPT, UNCHECKED = "OK", "MISMATCH", "CORRUPT", "ERROR"


def verify_file(path: str, backend: str, device: str) -> dict[str, Any]:
    """One file's verify result: ``status`` (OK, MISMATCH, CORRUPT, ERROR: unreadable or not
    checkable) and every tensor's and failing byte range's status and reason."""
    try:
        with Container(path) as c:
            report = c.integrity(backend, device, progress=None)
    except KernelpackError as exc:
        return {"file": path, "status": _status_of(exc), "error": str(exc), "tensors": 0, "items": []}
    items = [{"name": label, "status": _status_of(exc), "error": str(exc)} for label, exc in report.ranges.items()]
    for name, value in report.tensors.items():
        if isinstance(value, KernelpackError):
            items.append({"name": name, "status": _status_of(value), "error": str(value)})
        else:
            items.append({"name": name, "status": OK if value else MISMATCH, "error": None})
    statuses = {i["status"] for i in items}
    status = next((s for s in (UNCHECKED, CORRUPT, MISMATCH) if s in statuses), OK)
    return {"file": path, "status": status, "error": None, "tensors": len(report.tensors), "items": items}


def _status_of(exc: KernelpackError) -> str:
    """CORRUPT for a failed checksum or padding (the bytes changed), ERROR for anything else
    (not a container, a limit, a missing file)."""
    changed = exc.field in ("header_sha256", "padding") or "checksum" in exc.reason or "corrupt" in exc.reason
    return CORRUPT if changed else UNCHECKED


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0: every file's every tensor decodes to its digest; 1: a tensor or byte range is
    corrupted or mismatched; 2: a file could not be read or checked (or a bad argument)."""
    backend = args.backend or ("numpy" if args.device == "cpu" else "torch")
    get_ops(backend, args.device)  # a device this backend or machine lacks, refused before any read
    results = [verify_file(path, backend, args.device) for path in args.files]
    if args.json:
        print(json.dumps({"backend": backend, "device": args.device, "files": results}, indent=2))
    else:
        for result in results:
            _print_verify(result, args.verbose, f"({backend} on {args.device})")
    statuses = {r["status"] for r in results}
    return 2 if UNCHECKED in statuses else 1 if statuses - {OK} else 0


def _print_verify(result: dict[str, Any], verbose: bool, where: str) -> None:
    """Failures (every item with -v), then one line for the file when it failed or with -v. A
    file that cannot be read is the one-line error on stderr of every other command."""
    path = result["file"]
    if result["error"] is not None:
        if result["status"] == CORRUPT:
            print(f"{CORRUPT:8}  {path}: {result['error']}")
        else:
            print(f"kernelpack: error: {' '.join(result['error'].splitlines())}", file=sys.stderr)
        return
    for item in result["items"]:
        if verbose or item["status"] != OK:
            reason = f"  {item['error']}" if item["error"] else ""
            print(f"{item['status']:8}  {path}: {item['name']}{reason}")
    bad = [i for i in result["items"] if i["status"] != OK]
    tensors = result["tensors"]
    if bad:
        print(f"{path}: {len(bad)} failure(s) ({tensors} tensors) {where}")
    elif verbose:
        print(f"{path}: all {tensors} tensors decode to their digest {where}")


def cmd_unpack(args: argparse.Namespace) -> int:
    check_output(args.file, args.output, args.force)
    if not args.output.lower().endswith((".safetensors", ".onnx")):
        raise KernelpackError("unpack writes .safetensors (dense tensors) or .onnx (the attached graph with "
                              "its weights); give OUT one of those suffixes", path=args.output)
    if args.output.lower().endswith(".onnx"):
        from kernelpack.onnx_io import unpack_onnx

        model = unpack_onnx(args.file, args.output)
        print(f"{args.output}: ONNX model, {len(model.graph.initializer)} initializers, "
              f"{os.path.getsize(args.output)} bytes")
        return 0
    with Container(args.file) as c:
        metadata = c.metadata()
        bf16 = any(c.info(n).dtype == "bfloat16" for n in c.keys())
    if bf16:  # safetensors.numpy cannot hold bfloat16: decode with torch (same bits) to keep it
        need_module("torch", "unpacking bfloat16 tensors")
        state = load(args.file)
        writer = need_module("safetensors.torch", "writing .safetensors")
    else:
        state = load_numpy(args.file)
        writer = need_module("safetensors.numpy", "writing .safetensors")
    atomic_write(args.output, [writer.save(state, metadata)])
    print(f"{args.output}: {len(state)} dense tensors, {os.path.getsize(args.output)} bytes")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    for module in ("torch", "sklearn", "safetensors"):
        need_module(module, "the demo")
    from kernelpack import demo

    demo.run(quick=args.quick, out=args.out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kernelpack.serve import serve

    return serve(args.file, args.host, args.port, args.device, args.threads, args.name, args.limit, args.set)


def cmd_triton_config(args: argparse.Namespace) -> int:
    from kernelpack.triton_backend import write_model_dir

    folder = write_model_dir(args.file, args.repository, args.name, args.kind, args.count)
    print(f"{folder}: Triton Python-backend model (config.pbtxt, 1/model.py, 1/model.kpk)")
    return 0


# --- parser -------------------------------------------------------------------------
def _version() -> str:
    from kernelpack import __version__

    return __version__


def _format() -> str:
    from kernelpack.layout import VERSION

    return ".".join(map(str, VERSION))



class Parser(argparse.ArgumentParser):
    """argparse, its errors in the one-line form of every other error (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kernelpack: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kernelpack", description="Compressed CNN weights in a checksummed container (.kpk), "
        "decoded bit-exactly on any machine.")
    parser.add_argument("--version", action="version", version=f"kernelpack {_version()} (format {_format()})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pack", help="pack tensors into a .kpk container",
                       description="Pack a state_dict (.safetensors, .pt/.pth, .npz) into a container, or an "
                       ".onnx model: its weights as tensors, its graph attached (README, Serving).",
                       epilog=FORM_SYNTAX, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN",
                   help="a .safetensors, .pt/.pth (state_dict) or .npz file, or an .onnx model")
    p.add_argument("output", metavar="OUT", nargs="?",
                   help="the container to write, atomically (default: IN's name with .kpk for its suffix)")
    p.add_argument("-o", "--output", dest="out", metavar="OUT", help="the container to write (instead of OUT)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing on success (a lossy file still gets one warning line on stderr)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    p.add_argument("--form", action="append", default=[], metavar="PATTERN=FORM[:K=V,...]",
                   help="a form rule (repeatable; see below)")
    p.add_argument("--config", metavar="FORMS.json", help="form rules and default from a JSON file")
    p.add_argument("--level", type=int, default=DEFAULT_LEVEL, choices=range(1, 23), metavar="N",
                   help=f"zstd level 1..22 for payloads (default {DEFAULT_LEVEL}; 3 is up to 30x faster, "
                   "files 0.4-6%% larger on real models)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="a metadata entry (repeatable; .safetensors metadata is kept too)")
    p.add_argument("--max-error", type=float, metavar="E",
                   help="plan the weights no rule names (an .onnx model's Conv/ConvTranspose/Gemm/MatMul "
                   "weights, and its biases and BatchNormalization parameters in float16 at most; a state "
                   "dict's floating tensors of rank >= 2): each gets the smallest form "
                   "whose relative RMS weight error is <= E (0: exact); the other tensors stay exact")
    p.add_argument("--max-output-error", type=float, metavar="E",
                   help="for an .onnx model with --calibration: the smallest plan whose output error "
                   "||y'-y||/||y|| over all outputs, measured on the calibration inputs, is <= E")
    p.add_argument("--max-bytes", type=int, metavar="N",
                   help="the most accurate plan whose planned tensors take at most N bytes (zstd level 3 "
                   "estimate; measured output error reported with --calibration)")
    p.add_argument("--calibration", metavar="INPUTS.npz",
                   help="unlabeled model inputs, one array per model input (first axis = samples): fits "
                   "and plans against the model's outputs (.onnx models only)")
    p.add_argument("--plan-out", metavar="PLAN.json",
                   help="write the plan as a --config file (one rule per planned tensor)")
    p.set_defaults(run=cmd_pack)

    p = sub.add_parser("inspect", help="list tensors, forms, sizes (and errors against an original)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--original", metavar="IN",
                   help="the tensors that were packed: adds max abs and relative RMS error columns")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("verify", help="decode every tensor and check it against its digest",
                       description="Decode every tensor of every FILE and compare it with the SHA-256 "
                       "recorded at pack time; check every other byte too. Prints the failures (OK, "
                       "MISMATCH: decodes to other bits, CORRUPT: the bytes changed, ERROR: not checkable), "
                       "every tensor with -v. Exit 0: all good; 1: a corrupted or mismatched tensor; "
                       "2: a file that cannot be read or checked, or a bad argument.")
    p.add_argument("files", metavar="FILE", nargs="+")
    p.add_argument("-v", "--verbose", action="store_true", help="print every tensor, not only failures")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--backend", choices=("numpy", "torch"),
                   help="decode with numpy or torch (default: numpy on cpu, torch elsewhere)")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("unpack", help="decode every tensor into a dense .safetensors file (or .onnx model)",
                       description="Decode every tensor (numpy) into a dense .safetensors file with the "
                       "container's metadata. A container holding bfloat16 tensors is decoded with "
                       "torch (the same bits) and written with safetensors.torch, keeping bfloat16. "
                       "OUT.onnx: the attached ONNX graph with every weight filled in, a plain model.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("output", metavar="OUT.safetensors|OUT.onnx")
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(run=cmd_unpack)

    p = sub.add_parser("demo", help="train a small CNN on 8x8 digits and pack it in every form")
    p.add_argument("--quick", action="store_true", help="train for a few epochs only")
    p.add_argument("--out", metavar="DIR",
                   help="keep the containers and original.safetensors here (default: a temporary folder)")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("serve", help="serve a container's ONNX graph over HTTP (JSON, binary tensors, KServe v2)",
                       description="Load FILE (a container with its onnx.graph) into ONNX Runtime and serve it "
                       "until SIGTERM/SIGINT (graceful: requests under way are answered, exit 0). Paths, "
                       "bodies and bounds: the kernelpack.serve module docstring (README, Serving).")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for inference in all (default: all "
                   "cores), split over min(4, N) concurrent runs")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="ONNX Runtime provider: cuda (refuses to start without it), cpu, or auto (default: "
                   "CUDA if usable, else CPU)")
    p.add_argument("--name", help="the model's name in /v2/models/NAME (default: FILE's name without .kpk)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="a kernelpack.Limits field for reading FILE (default: kernelpack.serve.SERVICE_LIMITS)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a kernelpack.serve.Settings field: workers, timeouts, connection and body bounds")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("triton-config", help="write a Triton Python-backend model directory for a container",
                       description="Write REPOSITORY/NAME/config.pbtxt (inputs, outputs and types from FILE's "
                       "onnx.graph), REPOSITORY/NAME/1/model.py (kernelpack.triton_backend) and a copy of FILE "
                       "as REPOSITORY/NAME/1/model.kpk.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("repository", metavar="REPOSITORY", help="the model repository folder (created if missing)")
    p.add_argument("--name", help="the model's name (default: FILE's name without .kpk)")
    p.add_argument("--kind", choices=("cpu", "gpu"), default="cpu", help="instance kind (default cpu)")
    p.add_argument("--count", type=int, default=1, help="instances per device (default 1)")
    p.set_defaults(run=cmd_triton_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 digest mismatch, 2 error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KernelpackError as exc:
        message = str(exc)
    except MemoryError:
        message = "out of memory"
    except Exception as exc:  # a kernelpack bug: still one line, with what to report
        message = f"internal error (please report it): {type(exc).__name__}: {exc}"
    print(f"kernelpack: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return 2
