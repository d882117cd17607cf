"""One error contract in the client: every bad argument raises `LmscopeError` (also a `ValueError`) with the
gRPC status code the server would use, whether the client or the server notices it; and the analysis mixins
build only on the declared core interface (`lmscope.client.interface.ClientCore`)."""
from __future__ import annotations

import ast
import inspect
import pathlib

import numpy as np
import pytest

import lmscope.client as client_package
from lmscope.client import ControlVector, LmscopeError
from lmscope.client.core import CoreClient
from lmscope.client.interface import ClientCore

PROMPT = "The capital of France is"


def test_lmscope_error_is_a_value_error():
    assert issubclass(LmscopeError, ValueError)


@pytest.mark.parametrize("call", [
    lambda c: c.run(PROMPT, layers=[99]),
    lambda c: c.run(PROMPT, steer={99: np.ones(64)}),
    lambda c: c.generate(PROMPT, steer={99: np.ones(64)}),
    lambda c: c.attention(PROMPT, layers=[99]),
    lambda c: c.neurons(PROMPT, layer=99),
    lambda c: c.neuron_top_tokens(99, 0),
    lambda c: c.patch_sweep(PROMPT, "The capital of Spain is", layers=[99]),
    lambda c: c.refusal_direction(["a", "b"], ["c", "d"], layers=[99], batch_size=4, progress=False),
    lambda c: c.project([PROMPT, "Hello world"], layer=99, progress=False),
    lambda c: c.probe([PROMPT] * 6, np.arange(6.0), layer=99, folds=2, progress=False),
], ids=["run-layers", "steer", "generate-steer", "attention", "neurons", "neuron_top_tokens", "patch_sweep",
        "refusal_direction", "project", "probe"])
def test_layer_99_is_out_of_range_the_same_way_everywhere(client, call):
    with pytest.raises(LmscopeError) as info:
        call(client)
    assert info.value.code.name == "OUT_OF_RANGE"
    assert "layer 99 is out of range: the model has 4 blocks" in info.value.message, info.value.message


@pytest.mark.parametrize("call, code", [
    (lambda c: c.run(PROMPT, layers=["2"]), "INVALID_ARGUMENT"),
    (lambda c: c.run(PROMPT, dtype="bfloat16"), "INVALID_ARGUMENT"),
    (lambda c: c.run(PROMPT, logits="first"), "INVALID_ARGUMENT"),
    (lambda c: c.sites("blocks.*.nothing"), "INVALID_ARGUMENT"),
    (lambda c: c.top_k(np.zeros(4), temperature=0), "INVALID_ARGUMENT"),
    (lambda c: c.embed([PROMPT], pooling="max"), "INVALID_ARGUMENT"),
    (lambda c: c.attention(PROMPT, heads=[9]), "OUT_OF_RANGE"),
    (lambda c: c.run(PROMPT, positions=[50]), "OUT_OF_RANGE"),  # noticed by the server
    (lambda c: c.run([10 ** 6]), "OUT_OF_RANGE"),                # noticed by the server
    (lambda c: ControlVector.from_directions(np.ones((2, 4)), layers=[5]), "OUT_OF_RANGE"),
    (lambda c: ControlVector({}), "INVALID_ARGUMENT"),
])
def test_local_and_server_checks_raise_the_same_type(client, call, code):
    with pytest.raises(LmscopeError) as info:
        call(client)
    assert info.value.code.name == code
    assert str(info.value) == f"{code}: {info.value.message}"


# ----- the declared interface ----------------------------------------------------------------------

def _protocol_members() -> set[str]:
    return {name for name in vars(ClientCore) if not name.startswith("_")}


def test_the_core_client_implements_the_declared_interface():
    missing = {name for name in _protocol_members() if not hasattr(CoreClient, name)}
    assert not missing
    for name in _protocol_members() - {"n_layer"}:
        declared = inspect.signature(getattr(ClientCore, name))
        actual = inspect.signature(getattr(CoreClient, name))
        assert list(declared.parameters)[:2] == list(actual.parameters)[:2], name


def _mixins():
    folder = pathlib.Path(client_package.__file__).parent
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Mixin"):
                yield path.name, node


def test_mixins_use_only_the_declared_interface_and_their_own_methods():
    allowed = _protocol_members()
    found = list(_mixins())
    assert {name for _, name in ((p, n.name) for p, n in found)} >= {
        "LensMixin", "ProjectionMixin", "EmbeddingMixin", "InsideMixin", "SteeringMixin"}
    # A mixin may also call the public methods of the other mixins (an analysis built on another, e.g. the
    # tuned lens on `collect`), and keep state of its own (attributes it assigns itself); never a private
    # member of the core or of another mixin.
    public = {item.name for _, mixin in found for item in mixin.body
              if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_")}
    for path, mixin in found:
        own = {item.name for item in mixin.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
        own |= {target.attr for node in ast.walk(mixin) if isinstance(node, ast.Assign) for target in node.targets
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                and target.value.id == "self"}
        used = {node.attr for node in ast.walk(mixin)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"}
        undeclared = used - own - allowed - public
        assert not undeclared, f"{path}: {mixin.name} uses {sorted(undeclared)}, which ClientCore does not declare"
