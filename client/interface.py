"""`ClientCore`: what the analysis mixins (`lens`, `projection`, `embeddings`, `inside`, `steering`, `store`,
`tuned_lens`, `sae_analysis`) may call.

`Client` is `CoreClient` plus one mixin per kind of analysis. A mixin builds only on the methods declared
here, which `CoreClient` implements; nothing private of the core. A new analysis that needs a new server
capability adds a core method and declares it here (docs/developing.md, "Adding an analysis").
`tests/integration/test_client_errors.py` checks both directions: `CoreClient` has every member, and every
mixin uses only these members and its own methods.

Mixin methods annotate ``self: ClientCore`` where they call into the core, so type checkers see the
contract too.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from lmscope.proto.sites import SiteFilter
from lmscope.proto.wire import lmscope_pb2 as pb

from .results import Generation, ModelInfo, Run, Tokens


class ClientCore(Protocol):
    """The core client as the analysis mixins see it."""

    @property
    def n_layer(self) -> int: ...

    def model_info(self, refresh: bool = False) -> ModelInfo: ...

    def check_layer(self, layer, what: str = "layer") -> int: ...

    def sites(self, selection: SiteFilter = "*") -> list[str]: ...

    # tokens
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False,
                 chat: bool = False) -> Tokens: ...

    def detokenize(self, token_ids: Iterable[int]) -> str: ...

    def token_id(self, text: str) -> int: ...

    def token_pieces(self, ids: Iterable[int]) -> list[bytes]: ...

    def tokenize_pieces(self, ids: Iterable[int]) -> list[str]: ...

    # forward passes
    def run(self, prompt, **options) -> Run: ...

    def run_batch(self, prompts: Sequence, *, batch_size: int = 64, progress: bool = False,
                  **options) -> list[Run]: ...

    def iter_runs(self, prompts: Iterable, *, batch_size: int = 64, **options) -> Iterator[Run]: ...

    def run_request(self, prompts, **options) -> pb.RunRequest: ...

    def send_run(self, request: pb.RunRequest, metadata=None) -> list[Run]: ...

    def send_runs(self, requests: Iterable[pb.RunRequest], *,
                  describe: Callable[[int], str] | None = None) -> Iterator[Run]: ...

    def generate(self, prompt, **options) -> Generation: ...

    # the vocabulary side and the weights
    def unembed(self, vectors: np.ndarray, final_norm: bool = True) -> np.ndarray: ...

    def lens_vectors(self, vectors: np.ndarray, **spec) -> dict[str, np.ndarray]: ...

    def nearest_token_ids(self, vectors: np.ndarray, k: int = 10, table: str = "embedding",
                          exclude_ids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]: ...

    def weights(self, name: str, indices: Sequence[int] | None = None, axis: int = 0,
                dtype: str = "float32") -> np.ndarray: ...

    def embedding_rows(self, token_ids: Sequence[int]) -> np.ndarray: ...

    # any other unary RPC by name
    def call(self, method: str, request): ...
