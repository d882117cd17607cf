"""lmscope client: talk to an lmscope server and analyse what it returns (numpy results).

>>> from lmscope.client import Client      # doctest: +SKIP
>>> c = Client("127.0.0.1:50051")         # doctest: +SKIP
"""
from .client import Client
from .control_vector import ControlVector
from .errors import LmscopeError
from .interventions import Intervention, Patch
from .results import Generation, ModelInfo, Run, Tokens, TopK
from .steering import LayerScore, RefusalDirection
from .store import ActivationStore
from .tuned_lens import TunedLens

__all__ = ["Client", "LmscopeError", "Intervention", "Patch", "Generation", "ModelInfo", "Run", "TopK", "Tokens",
           "ControlVector", "LayerScore", "RefusalDirection", "ActivationStore", "TunedLens"]
