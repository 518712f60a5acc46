"""Graph safety (spec/FORMAT.md, section 10): a container's ``onnx.graph`` never makes ONNX
Runtime read a local file. Every tensor anywhere in the ModelProto is inline (within the size
bound) or, as an initializer of the main graph, a reference to a container tensor; anything
else is refused with KernelpackError before a session exists: by ``ort_session``,
``graph_and_weights``, ``kernelpack unpack F out.onnx`` and the HTTP service. ``verify``
checks digests, not the graph, and still passes (the spec's decision).

Each hostile graph here is first shown to be a real attack: given to ONNX Runtime directly,
in a folder holding a secret ``.env``, it returns the secret's bytes.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernelpack
from kernelpack.cli import main
from kernelpack.errors import KernelpackError
from kernelpack.ort import GRAPH, LOCATION, MAX_DEPTH, WeightRef, check_graph, graph_and_weights, ort_session

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ["CPUExecutionProvider"]
SECRET = b"API_KEY=kp-test-secret-7f3a9c1e\n"
AT = f"attachments.{GRAPH}"


# --- hostile graphs ----------------------------------------------------------------------------
def external(name: str, location: str = ".env", data_type: int = TensorProto.UINT8, dims: tuple = (len(SECRET),),
             **entries: int) -> TensorProto:
    """A tensor whose data ONNX Runtime reads from the file ``location`` (more entries: offset, length)."""
    tensor = TensorProto(name=name, data_type=data_type, dims=dims, data_location=TensorProto.EXTERNAL)
    for key, value in {"location": location, **entries}.items():
        tensor.external_data.add(key=key, value=str(value))
    return tensor


def model(nodes: list, initializers: list = (), output: str = "y", elem: int = TensorProto.UINT8,
          **graph: list) -> onnx.ModelProto:
    """A model whose output ``y`` is what ``nodes`` compute, no inputs unless ``graph`` names some."""
    inputs = graph.pop("inputs", [])
    made = helper.make_graph(nodes, "hostile", inputs, [helper.make_tensor_value_info(output, elem, None)],
                             list(initializers), **graph)
    return helper.make_model(made, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                             ir_version=8)


def identity(source: str) -> onnx.NodeProto:
    return helper.make_node("Identity", [source], ["y"])


def branch(name: str, tensor: TensorProto) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node("Identity", [tensor.name], [f"{name}_y"])], name, [],
                             [helper.make_tensor_value_info(f"{name}_y", tensor.data_type, None)], [tensor])


def subgraph(tensor: Callable[[str], TensorProto]) -> onnx.ModelProto:
    """If(cond) whose branches read initializers of their own."""
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", tensor("a")),
                            else_branch=branch("else", tensor("b")))
    return model([node], inputs=[helper.make_tensor_value_info("cond", TensorProto.BOOL, [])])


def sparse() -> onnx.ModelProto:
    indices = numpy_helper.from_array(np.arange(len(SECRET), dtype=np.int64), "leak_indices")
    return model([identity("leak")], sparse_initializer=[helper.make_sparse_tensor(external("leak"), indices,
                                                                                     [len(SECRET)])])


def function() -> onnx.ModelProto:
    body = helper.make_function("local", "Leak", [], ["o"], [helper.make_node("Constant", [], ["o"],
                                                                               value=external("c"))],
                                [helper.make_opsetid("", 17)])
    made = model([helper.make_node("Leak", [], ["y"], domain="local")])
    made.functions.append(body)
    return made


def training_info() -> onnx.ModelProto:
    made = model([identity("w")], [numpy_helper.from_array(np.ones(4, np.uint8), "w")])
    made.training_info.add().initialization.CopyFrom(branch("init", external("leak")))
    return made


def reference(name: str = "w", dims: tuple = (16,)) -> TensorProto:
    return external(name, LOCATION, TensorProto.FLOAT, dims)


def with_raw_data() -> onnx.ModelProto:
    tensor = reference()
    tensor.raw_data = bytes(64)
    return model([identity("w")], [tensor], elem=TensorProto.FLOAT)


def entries_without_external_flag() -> onnx.ModelProto:
    tensor = numpy_helper.from_array(np.ones(4, np.uint8), "w")
    tensor.external_data.add(key="location", value=".env")
    return model([identity("w")], [tensor])


def reference_with_offset() -> onnx.ModelProto:
    made = model([identity("w")], [reference()], elem=TensorProto.FLOAT)
    made.graph.initializer[0].external_data.add(key="offset", value="0")
    return made


def repeated_reference() -> onnx.ModelProto:
    return model([identity("w")], [reference(), numpy_helper.from_array(np.ones(16, np.float32), "w")],
                 elem=TensorProto.FLOAT)


def ep_context() -> onnx.ModelProto:
    node = helper.make_node("EPContext", [], ["y"], domain="com.microsoft", embed_mode=0, ep_cache_context=".env")
    return model([node])


#: name -> (the hostile ModelProto, the field refused, the tensor named); each makes ORT read
#: a file, names a file, or breaks a rule of section 10.
HOSTILE: dict[str, tuple[Callable[[], onnx.ModelProto], str, str | None]] = {
    "relative location": (lambda: model([identity("leak")], [external("leak")]),
                          "graph.initializer[0].external_data", "leak"),
    "absolute location": (lambda: model([identity("leak")], [external("leak", os.path.abspath(".env"))]),
                          "graph.initializer[0].external_data", "leak"),
    "offset and length": (lambda: model([identity("leak")], [external("leak", offset=0, length=len(SECRET))]),
                          "graph.initializer[0].external_data", "leak"),
    "location kernelpack and more": (reference_with_offset, "graph.initializer[0].external_data", "w"),
    "Constant node": (lambda: model([helper.make_node("Constant", [], ["y"], value=external("c"))]),
                      "graph.node[0].attribute[0].t.external_data", "c"),
    "Constant node with a reference": (lambda: model([helper.make_node("Constant", [], ["y"], value=reference("w"))],
                                                     elem=TensorProto.FLOAT),
                                       "graph.node[0].attribute[0].t.external_data", "w"),
    "subgraph": (lambda: subgraph(external), "graph.node[0].attribute[0].g.initializer[0].external_data", "b"),
    "subgraph with a reference": (lambda: subgraph(lambda n: reference(n)),
                                  "graph.node[0].attribute[0].g.initializer[0].external_data", "b"),
    "sparse initializer": (sparse, "graph.sparse_initializer[0].values.external_data", "leak"),
    "function": (function, "functions[0].node[0].attribute[0].t.external_data", "c"),
    "training_info": (training_info, "training_info[0].initialization.initializer[0].external_data", "leak"),
    "external_data without EXTERNAL": (entries_without_external_flag, "graph.initializer[0].external_data", "w"),
    "EXTERNAL without external_data": (lambda: model([identity("w")], [TensorProto(
        name="w", data_type=TensorProto.FLOAT, dims=[16], data_location=TensorProto.EXTERNAL)], elem=TensorProto.FLOAT),
        "graph.initializer[0].external_data", "w"),
    "reference holding data": (with_raw_data, "graph.initializer[0].raw_data", "w"),
    "reference to a missing tensor": (lambda: model([identity("absent")], [reference("absent")],
                                                    elem=TensorProto.FLOAT),
                                      "graph.initializer[0].name", "absent"),
    "repeated reference name": (repeated_reference, "graph.initializer[0].name", "w"),
    "EPContext node": (ep_context, "graph.node[0].op_type", None),
}


#: The hostile graphs with which ONNX Runtime, given the graph directly, returns the secret.
READS_THE_SECRET = ["relative location", "offset and length", "Constant node", "subgraph", "sparse initializer",
                    "function"]


@pytest.fixture
def secret_folder(tmp_path, monkeypatch) -> str:
    """The working directory, holding ``.env`` with the secret (as a service's folder would)."""
    folder = tmp_path / "service"
    folder.mkdir()
    (folder / ".env").write_bytes(SECRET)
    monkeypatch.chdir(folder)
    return str(folder)


def container(folder: str, graph: bytes, name: str = "hostile.kpk") -> str:
    """A container of one float tensor ``w`` (16 ones) with ``graph`` attached."""
    path = os.path.join(folder, name)
    kernelpack.save({"w": np.ones(16, np.float32)}, path, attachments={GRAPH: graph})
    return path


def secret_free(*texts: str | bytes) -> bool:
    shown = SECRET.strip().decode()
    return all(shown not in (t.decode("utf-8", "replace") if isinstance(t, bytes) else t) for t in texts)


def run_directly(graph: bytes) -> np.ndarray:
    session = ort.InferenceSession(graph, providers=CPU)
    feeds = {"cond": np.array(False)} if [i.name for i in session.get_inputs()] == ["cond"] else {}
    return session.run(None, feeds)[0]


# --- the attacks are real ------------------------------------------------------------------------
@pytest.mark.parametrize("case", READS_THE_SECRET)
def test_each_hostile_graph_makes_onnx_runtime_itself_read_the_secret(secret_folder, case):
    assert run_directly(HOSTILE[case][0]().SerializeToString()).tobytes() == SECRET


# --- refused before a session exists -----------------------------------------------------------
@pytest.fixture
def no_sessions(monkeypatch) -> list:
    """ONNX Runtime sessions made while the test runs (none may be)."""
    made: list = []
    real = ort.InferenceSession

    def record(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", record)
    return made


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_ort_session_and_graph_and_weights_refuse_before_a_session(secret_folder, no_sessions, case):
    build, where, tensor = HOSTILE[case]
    path = container(secret_folder, build().SerializeToString())
    for call in (lambda: ort_session(path, CPU), lambda: graph_and_weights(path)):
        with pytest.raises(KernelpackError) as info:
            call()
        assert (info.value.path, info.value.field, info.value.tensor) == (path, f"{AT}.{where}", tensor)
        assert path in str(info.value) and secret_free(str(info.value))
    assert no_sessions == []


def test_a_graph_of_references_and_inline_tensors_runs(secret_folder):
    """The rule refuses nothing section 10 allows: a reference and inline tensors, in a subgraph too."""
    then = branch("then", numpy_helper.from_array(np.full(16, 2, np.float32), "two"))
    graph = model([helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=branch("else", reference()))
                   ], elem=TensorProto.FLOAT, inputs=[helper.make_tensor_value_info("cond", TensorProto.BOOL, [])])
    graph.graph.node[0].attribute[0].g.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros(16, np.float32), "w"))
    graph.graph.node.insert(0, helper.make_node("Identity", ["w"], ["unused"]))
    graph.graph.initializer.append(reference())
    session = ort_session(container(secret_folder, graph.SerializeToString()), CPU)
    assert np.array_equal(session.run(None, {"cond": np.array(True)})[0], np.full(16, 2, np.float32))
    assert np.array_equal(session.run(None, {"cond": np.array(False)})[0], np.zeros(16, np.float32))


def test_unpack_to_onnx_refuses_and_writes_nothing(secret_folder, capsys):
    for case in READS_THE_SECRET + ["absolute location"]:
        path = container(secret_folder, HOSTILE[case][0]().SerializeToString())
        out = os.path.join(secret_folder, "out.onnx")
        assert main(["unpack", path, out]) == 2, case
        printed = capsys.readouterr()
        assert printed.err.startswith("kernelpack: error: ") and printed.err.count("\n") == 1
        assert f"{AT}.{HOSTILE[case][1]}" in printed.err and not os.path.exists(out)
        assert secret_free(printed.out, printed.err)


def test_verify_checks_digests_not_the_graph(secret_folder, capsys):
    """The decision of section 10: verify passes (every tensor decodes to its digest); the graph
    is refused where it is used."""
    path = container(secret_folder, HOSTILE["relative location"][0]().SerializeToString())
    assert main(["verify", path]) == 0
    printed = capsys.readouterr()
    assert secret_free(printed.out, printed.err)


def test_the_http_service_refuses_to_start_on_a_hostile_container(secret_folder):
    """``python serving/http_service.py F --port 0 --cpu`` as test_serving starts it: it exits
    with the reason instead of serving (a served graph answered /predict with the secret)."""
    path = container(secret_folder, HOSTILE["relative location"][0]().SerializeToString())
    done = subprocess.run([sys.executable, os.path.join(ROOT, "serving", "http_service.py"), path, "--port", "0",
                           "--cpu"], capture_output=True, timeout=120, cwd=secret_folder)
    assert done.returncode == 2 and b"serving" not in done.stdout
    (line,) = done.stderr.decode().splitlines()  # one line: the reason, no traceback
    assert "error" in line and f"{AT}.graph.initializer[0].external_data" in line
    assert secret_free(done.stdout, done.stderr)


# --- the inline bound --------------------------------------------------------------------------
def declared(dims: list[int], data_type: int = TensorProto.INT64) -> bytes:
    """A graph whose Constant declares ``dims`` of ``data_type`` and carries no data."""
    tensor = TensorProto(name="big", data_type=data_type, dims=dims)
    return model([helper.make_node("Constant", [], ["y"], value=tensor)], elem=data_type).SerializeToString()


def test_inline_tensors_declare_at_most_max_decoded_bytes_in_all(tmp_path):
    assert check_graph(declared([1000]), max_bytes=8000) == []  # 1000 int64: 8000 bytes
    with pytest.raises(KernelpackError, match="max_decoded_bytes=7999") as info:
        check_graph(declared([1000]), max_bytes=7999)
    assert (info.value.field, info.value.tensor) == (f"{AT}.graph.node[0].attribute[0].t", "big")
    with pytest.raises(KernelpackError, match="max_decoded_bytes"):  # 2^40 floats, 50 bytes of graph
        check_graph(declared([1 << 20, 1 << 20], TensorProto.FLOAT))
    assert check_graph(declared([0, 1 << 62])) == []  # no elements
    strings = declared([10], TensorProto.STRING)  # 32 bytes each: what ORT allocates per string
    assert check_graph(strings, max_bytes=320) == []
    with pytest.raises(KernelpackError, match="max_decoded_bytes"):
        check_graph(strings, max_bytes=319)
    huge_sparse = model([identity("s")], sparse_initializer=[helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(1, np.float32), "s"), numpy_helper.from_array(np.zeros(1, np.int64), "i"),
        [1 << 20, 1 << 20])], elem=TensorProto.FLOAT)
    with pytest.raises(KernelpackError) as info:  # ORT densifies it as it loads the graph
        check_graph(huge_sparse.SerializeToString())
    assert info.value.field == f"{AT}.graph.sparse_initializer[0].dims"
    path = container(str(tmp_path), declared([1 << 28]))  # 2 GiB declared in a 100-byte attachment
    with pytest.raises(KernelpackError, match="max_decoded_bytes"):
        ort_session(path, CPU)
    with pytest.raises(KernelpackError, match="max_decoded_bytes=1024"):
        graph_and_weights(container(str(tmp_path), declared([200]), "small.kpk"),
                          kernelpack.Limits(max_decoded_bytes=1024))


# --- the wire reader -------------------------------------------------------------------------
def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return key(number, 2) + varint(len(payload)) + payload


def number(n: int, value: int) -> bytes:
    return key(n, 0) + varint(value)


def wire_tensor(location: bytes, packed: bool) -> bytes:
    """TensorProto w: dims [2, 3, 4], FLOAT, external data at ``location``."""
    dims = field(1, bytes([2, 3, 4])) if packed else b"".join(number(1, d) for d in (2, 3, 4))
    return dims + number(2, 1) + field(8, b"w") + field(13, field(1, b"location") + field(2, location)) + number(14, 1)


def initializer(tensor: bytes) -> bytes:
    return field(7, field(5, tensor))  # ModelProto.graph.initializer


def test_references_are_read_with_dims_packed_or_not():
    for packed in (True, False):  # onnx writes dims unpacked; a proto3-style writer packs them
        assert check_graph(initializer(wire_tensor(b"kernelpack", packed))) == [WeightRef("w", 1, (2, 3, 4))]
        with pytest.raises(KernelpackError, match="external data"):
            check_graph(initializer(wire_tensor(b"w.bin", packed)))


def nested(levels: int) -> bytes:
    """ModelProto.graph, then ``levels`` times node -> attribute -> g: each message holds only the
    next, so the bytes are the headers, outermost first (built inside out, in linear time)."""
    numbers = [7] + [1, 5, 6] * levels  # graph, then node, attribute, g
    headers, inner = [], 0
    for n in reversed(numbers):
        header = key(n, 2) + varint(inner)
        headers.append(header)
        inner += len(header)
    return b"".join(reversed(headers))


#: A FLOAT TensorProto of dims [2^20]: twice in one singular field, protobuf would merge them.
SPLIT_DIMS = number(1, 1 << 20) + number(2, 1)
MALFORMED = {  # name: (attachment bytes, the reason given)
    "truncated length": (b"\x3a\xff\xff", "truncated or overlong varint"),
    "truncated nested length": (field(7, b"\x2a\x85"), "truncated or overlong varint"),
    "11-byte varint": (b"\x3a" + b"\xff" * 10 + b"\x01", "truncated or overlong varint"),
    "varint beyond 64 bits": (number(1, 1) + b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", "beyond 64 bits"),
    "group": (field(7, field(5, key(1, 3))), "wire type 3"),
    "wire type 7": (field(7, key(5, 7)), "wire type 7"),
    "field number 0": (field(7, key(0, 0) + b"\x00"), "field number 0"),
    "length beyond the buffer": (field(7, key(5, 2) + varint(200) + b"short"), "past the end"),
    "length beyond the parent": (b"\x3a\x05\x2a\x10abc", "past the end"),
    "message as a number": (field(7, key(5, 0) + b"\x01"), "wire type 0; a message is length-delimited"),
    "negative dim": (initializer(number(1, (1 << 64) - 1)), "negative dimension"),
    "name not UTF-8": (initializer(field(8, b"\xff\xfe")), "not UTF-8"),
    "dims as fixed32": (initializer(key(1, 5) + b"\x00\x00\x00\x00"), "dims has wire type 5"),
    "data_location as bytes": (initializer(field(14, b"\x01")), "data_location has wire type 2"),
    "a single message twice": (field(7, field(1, field(5, field(5, SPLIT_DIMS) + field(5, SPLIT_DIMS)))),
                               "occurs twice"),  # merged, Constant t of dims [2^20, 2^20]
    "sparse values twice": (field(7, field(15, field(1, SPLIT_DIMS) * 2)), "occurs twice"),
    "ORT format": (b"\x12\x06abORTM", "ORT-format"),
    "nested past the bound": (nested(MAX_DEPTH), f"deeper than {MAX_DEPTH}"),
    "nesting bomb": (nested(100_000), f"deeper than {MAX_DEPTH}"),  # 1.5 MB; no RecursionError
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_protobuf_is_a_kernelpack_error_naming_the_attachment(case):
    graph, reason = MALFORMED[case]
    with pytest.raises(KernelpackError, match=reason) as info:
        check_graph(graph, "f.kpk")
    assert info.value.path == "f.kpk" and info.value.field.startswith(AT)


EDITS = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(["set", "insert", "cut"])),
                 min_size=1, max_size=8)


def mutated(edits: list[tuple[int, int, str]]) -> bytes:
    graph = bytearray(mutation_seed())
    for position, byte, edit in edits:
        position %= len(graph)
        if edit == "set":
            graph[position] = byte
        elif edit == "insert":
            graph.insert(position, byte)
        else:
            del graph[position:position + byte % 8 + 1]
    return bytes(graph)


def onnx_tensors(model: onnx.ModelProto) -> list[tuple[TensorProto, bool]]:
    """Every TensorProto of a parsed model, with whether it is a main-graph initializer: the
    onnx package's view, walked independently of the wire reader."""
    found: list[tuple[TensorProto, bool]] = []

    def sparse_parts(sparse_tensors: list) -> None:
        found.extend((part, False) for s in sparse_tensors for part in (s.values, s.indices))

    def graph(g: onnx.GraphProto, main: bool) -> None:
        found.extend((t, main) for t in g.initializer)
        sparse_parts(g.sparse_initializer)
        for n in g.node:
            attributes(n.attribute)

    def attributes(items: list) -> None:
        for a in items:
            found.extend((t, False) for t in [a.t] * a.HasField("t") + list(a.tensors))
            sparse_parts([a.sparse_tensor] * a.HasField("sparse_tensor") + list(a.sparse_tensors))
            for g in [a.g] * a.HasField("g") + list(a.graphs):
                graph(g, False)

    graph(model.graph, True)
    for f in model.functions:
        attributes(f.attribute_proto)
        for n in f.node:
            attributes(n.attribute)
    for info in model.training_info:
        graph(info.initialization, False)
        graph(info.algorithm, False)
    return found


@given(EDITS)
def test_mutated_graphs_give_references_or_a_kernelpack_error(edits):
    """Byte edits of a graph with a subgraph, a sparse initializer, a function and a reference:
    check_graph raises KernelpackError or returns references, and then the onnx package parses
    no external data but those references (measured: 100,000 mutations, no disagreement)."""
    graph = mutated(edits)
    try:
        refs = check_graph(graph)
    except KernelpackError:
        return
    try:
        model = onnx.load_from_string(graph)
    except Exception:  # protobuf refuses what the wire check does not read: refused there
        return
    names = {r.name for r in refs}
    for tensor, main in onnx_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
            assert main and tensor.name in names
            assert [(e.key, e.value) for e in tensor.external_data] == [("location", LOCATION)]


@functools.lru_cache(maxsize=1)
def mutation_seed() -> bytes:
    """A graph that passes: inline tensors in a subgraph, a sparse initializer and a function."""
    inline = lambda name: numpy_helper.from_array(np.ones(3, np.uint8), name)  # noqa: E731
    made = subgraph(inline)
    made.graph.initializer.append(reference())
    made.graph.sparse_initializer.append(helper.make_sparse_tensor(
        inline("s"), numpy_helper.from_array(np.arange(3, dtype=np.int64), "si"), [5]))
    made.functions.append(helper.make_function("local", "F", [], ["o"], [helper.make_node(
        "Constant", [], ["o"], value=inline("c"))], [helper.make_opsetid("", 17)]))
    assert [r.name for r in check_graph(made.SerializeToString())] == ["w"]
    return made.SerializeToString()


def test_nesting_up_to_the_bound_is_read():
    check_graph(nested(MAX_DEPTH // 3 - 1))


def test_malformed_attachment_through_ort_session(tmp_path, no_sessions):
    path = container(str(tmp_path), nested(100_000))
    with pytest.raises(KernelpackError, match="deeper"):
        ort_session(path, CPU)
    assert no_sessions == []


def test_onnx_runtime_refusing_a_checked_graph_is_a_kernelpack_error_naming_the_file(tmp_path):
    graph = model([helper.make_node("NoSuchOp", ["w"], ["y"], domain="local")], [reference()],
                  elem=TensorProto.FLOAT).SerializeToString()
    path = container(str(tmp_path), graph)
    with pytest.raises(KernelpackError, match="onnxruntime cannot build a session") as info:
        ort_session(path, CPU)
    assert (info.value.path, info.value.field) == (path, AT)
