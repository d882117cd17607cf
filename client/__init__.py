"""lmscope client: talk to an lmscope server and analyse what it returns (numpy results).

>>> from lmscope.client import Client      # doctest: +SKIP
>>> c = Client("127.0.0.1:50051")         # doctest: +SKIP
"""
import importlib

# Where each public name lives. Resolved on first use (PEP 562): the server's model workers import this
# package's codec and wire stubs (`lmscope.client.tensors`, `.wire`, `.sites`) and must not pay for gRPC,
# plotting or scikit-learn they never call (measured: ~29 MB of a worker's resident memory).
_EXPORTS = {
    "Client": ".client", "ControlVector": ".control_vector", "LmscopeError": ".errors",
    "Intervention": ".interventions", "Patch": ".interventions", "Generation": ".results",
    "ModelInfo": ".results", "Run": ".results", "Tokens": ".results", "TopK": ".results",
    "LayerScore": ".steering", "RefusalDirection": ".steering", "ActivationStore": ".store",
    "TunedLens": ".tuned_lens",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
