"""lmscope client: talk to an lmscope server and analyse what it returns (numpy results).

>>> from lmscope.client import Client      # doctest: +SKIP
>>> c = Client("127.0.0.1:50051")         # doctest: +SKIP
"""
import importlib
import sys

# The codec, the site names and the GGUF reader moved to `lmscope.proto` (the contract the server and the
# client share) on 2026-12-07; their old names stay importable for scripts written before (CHANGELOG.md).
for _moved in ("sites", "tensors", "gguf_file"):
    sys.modules[f"{__name__}.{_moved}"] = importlib.import_module(f"lmscope.proto.{_moved}")

# Where each public name lives. Resolved on first use (PEP 562): `import lmscope.client` (a script that needs
# one analysis, the CLI's start-up) does not pay for gRPC, plotting and scikit-learn until they are used.
_EXPORTS = {
    "Client": ".client", "ControlVector": ".control_vector", "LmscopeError": ".errors",
    "Intervention": ".interventions", "Patch": ".interventions", "Generation": ".results",
    "ModelInfo": ".results", "Run": ".results", "Tokens": ".results", "TopK": ".results",
    "LayerScore": ".steering", "RefusalDirection": ".steering",
    "RefusalEvaluation": ".steering", "RefusalMeasure": ".steering", "ActivationStore": ".store",
    "TunedLens": ".tuned_lens", "SparseAutoencoder": ".sae",
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
