"""The fake `sglang` (tests/fakes) against the real SGLang's source (opt-in: the `sglang_args`
nox session installs the real wheel without its CUDA stack and sets DYNAMO_SGLANG_REAL=1).

`check_sglang_fakes.py` holds the fake to what the code uses (`protocols`, with mypy); this
holds it to SGLang itself: every method of the fake that the code or the tests call has the
real method's parameters (the same names, in the same order, with the same defaults; the
fake may leave optional ones out), `Engine.async_encode` exactly SGLang's, and the fake's
`EmbeddingReqInput` fields are SGLang's. Both sides are read as source (`ast`), so nothing of
SGLang's CUDA stack is imported. Then the request the embedding handler builds goes through
the real `EmbeddingReqInput`'s own normalisation: that class alone, compiled from SGLang's
source (its module, `sglang.srt.managers.io_struct`, imports the scheduler and with it the
CUDA stack)."""

from __future__ import annotations
import __future__

import ast
import collections
import dataclasses
import importlib.util
import os
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

from dynamo_core.llm.protocol import PreprocessedEmbeddingRequest
from sglang_testing import FAKES

pytestmark = pytest.mark.skipif(
    not os.environ.get("DYNAMO_SGLANG_REAL"),
    reason="needs the real sglang package: nox -s sglang_args",
)

#: (name, "positional" or "keyword", the default's source or None)
Param = tuple[str, str, str | None]
Function = ast.FunctionDef | ast.AsyncFunctionDef

FAKE_ENGINE = "srt/entrypoints/engine.py"
#: class, method, the real file, the fake file, whether the fake must be exactly the real one
METHODS = [
    ("Engine", "async_encode", "srt/entrypoints/engine.py", FAKE_ENGINE, True),
    ("Engine", "async_generate", "srt/entrypoints/engine.py", FAKE_ENGINE, False),
    ("Engine", "shutdown", "srt/entrypoints/engine.py", FAKE_ENGINE, True),
    ("TokenizerManager", "generate_request", "srt/managers/tokenizer_manager.py", FAKE_ENGINE, True),
    ("TokenizerManager", "abort_request", "srt/managers/tokenizer_manager.py", FAKE_ENGINE, True),
]  # fmt: skip


def real_file(relative: str) -> Path:
    spec = importlib.util.find_spec("sglang")  # finds the package without importing it
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / relative


def fake_file(relative: str) -> Path:
    return FAKES / "sglang" / relative


def find_class(path: Path, name: str) -> ast.ClassDef:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"{path}: no class {name}")


def find_method(path: Path, cls: str, name: str) -> Function:
    for item in find_class(path, cls).body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name == name:
            return item
    raise AssertionError(f"{path}: no {cls}.{name}")


def params(fn: Function) -> list[Param]:
    args = fn.args
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += args.defaults
    found: list[Param] = [
        (p.arg, "positional", None if d is None else ast.unparse(d))
        for p, d in zip(positional, defaults, strict=True)
    ]
    found += [
        (p.arg, "keyword", None if d is None else ast.unparse(d))
        for p, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
    ]
    assert args.vararg is None, f"{fn.name} takes *{args.vararg.arg}"
    return found


def assert_ordered_subset(fake: list[Param], real: list[Param], what: str) -> None:
    """Each of the fake's parameters is the real one (name, kind, default), in the real order;
    a parameter the fake leaves out has a default in SGLang (so a call valid on the fake is
    valid on SGLang)."""
    names = [p[0] for p in real]
    missing = [p[0] for p in fake if p[0] not in names]
    assert not missing, f"{what}: not SGLang's parameters: {missing}"
    positions = [names.index(p[0]) for p in fake]
    assert positions == sorted(positions), f"{what}: parameters out of SGLang's order"
    for p in fake:
        assert p == real[names.index(p[0])], f"{what}: {p} is {real[names.index(p[0])]} in SGLang"
    left_out = [p for p in real if p[0] not in {f[0] for f in fake}]
    assert all(p[2] is not None for p in left_out), f"{what}: leaves out required {left_out}"


@pytest.mark.parametrize(("cls", "name", "real", "fake", "exact"), METHODS)
def test_the_fakes_methods_are_sglangs(
    cls: str, name: str, real: str, fake: str, exact: bool
) -> None:
    theirs = find_method(real_file(real), cls, name)
    ours = find_method(fake_file(fake), cls, name)
    what = f"{cls}.{name}"
    assert type(ours) is type(theirs), f"{what}: async in one, not in the other"
    if exact:
        assert params(ours) == params(theirs), what
    else:
        assert_ordered_subset(params(ours), params(theirs), what)


def fields(path: Path, cls: str) -> list[Param]:
    return [
        (node.target.id, "field", None if node.value is None else ast.unparse(node.value))
        for node in find_class(path, cls).body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    ]


def test_the_fakes_embedding_request_fields_are_sglangs() -> None:
    theirs = fields(real_file("srt/managers/io_struct.py"), "EmbeddingReqInput")
    ours = fields(fake_file("srt/managers/io_struct.py"), "EmbeddingReqInput")
    assert {"input_ids", "rid", "dimensions", "text"} <= {f[0] for f in ours}
    assert_ordered_subset(ours, theirs, "EmbeddingReqInput")


def real_embedding_req_input(monkeypatch: pytest.MonkeyPatch) -> Any:
    """SGLang's `EmbeddingReqInput` class, compiled from its source with what it uses."""
    path = real_file("srt/managers/io_struct.py")
    node = find_class(path, "EmbeddingReqInput")
    code = compile(
        ast.Module(body=[node], type_ignores=[]),
        str(path),
        "exec",
        flags=__future__.annotations.compiler_flag,  # as the module has it: no evaluation
        dont_inherit=True,
    )
    module = types.ModuleType("sglang.srt.managers.io_struct")
    module.__dict__.update(
        dataclass=dataclasses.dataclass,
        field=dataclasses.field,
        uuid=uuid,
        Counter=collections.Counter,
    )
    # `dataclass` reads the class's module; the handler imports the class from it
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(code, module.__dict__)
    return module


def test_sglang_takes_the_handlers_embedding_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request `EmbeddingHandler` sends, as SGLang's tokenizer manager first reads it."""
    real_embedding_req_input(monkeypatch)
    from dynamo_sglang.engine import _takes_dimensions
    from dynamo_sglang.handlers import embedding_request

    assert _takes_dimensions()  # 0.5.23 shortens Matryoshka vectors
    request = PreprocessedEmbeddingRequest(token_ids=[[1, 2], [3]], dimensions=16)
    obj = embedding_request(request, "r")
    obj.normalize_batch_and_arguments()
    assert (obj.is_single, obj.batch_size) == (False, 2)
    assert (obj.rid, obj.input_ids, obj.dimensions) == (["r-0", "r-1"], [[1, 2], [3]], 16)
    one = embedding_request(PreprocessedEmbeddingRequest(token_ids=[[7]]), "q")
    one.normalize_batch_and_arguments()
    assert (one.is_single, one.batch_size, one.rid) == (False, 1, ["q-0"])  # still a batch
