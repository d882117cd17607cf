"""`Client`: the core RPCs plus one mixin per kind of analysis, each in its own module."""
from __future__ import annotations

from .core import CoreClient
from .embeddings import EmbeddingMixin
from .inside import InsideMixin
from .lens import LensMixin
from .projection import ProjectionMixin
from .sae_analysis import SaeMixin
from .steering import SteeringMixin
from .store import StoreMixin
from .tuned_lens import TunedLensMixin


class Client(LensMixin, ProjectionMixin, EmbeddingMixin, InsideMixin, SteeringMixin, StoreMixin, TunedLensMixin,
             SaeMixin, CoreClient):
    """Connect to an lmscope server: ``Client("127.0.0.1:50051")`` (see `CoreClient` for options)."""
