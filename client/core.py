"""The core client: one method per server capability, numpy results, readable errors.

`Client` (in `lmscope.client`) is this class plus the analysis mixins (lenses, steering, attention, ...),
each in its own module and each built only on the methods `ClientCore` (in `lmscope.client.interface`)
declares. Every error is an `LmscopeError` (`lmscope.client.errors`).

>>> from lmscope.client import Client                          # doctest: +SKIP
>>> c = Client("127.0.0.1:50051")                              # doctest: +SKIP
>>> run = c.run("The capital of France is")                    # doctest: +SKIP
>>> run.hidden_states.shape   # (n_layer + 1, n_tokens, n_embd)  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence

import grpc
import numpy as np

from lmscope.proto import shared_memory as shared
from lmscope.proto import tensors
from lmscope.proto.sites import SiteFilter, select_sites
from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.proto.wire import lmscope_pb2_grpc as pb_grpc

from . import interventions as iv
from .dispatch import check_batch_size, ordered_calls
from .errors import LmscopeError, check_layer, invalid_argument
from .results import Generation, ModelInfo, Run, Tokens, TopK
from .servers import ServerSet, service_config

DEFAULT_ADDRESS = "127.0.0.1:50051"

log = logging.getLogger("lmscope.client")


class ModelMismatchError(LmscopeError):
    """The servers behind one client hold different models (their GGUF files' sha256 differ)."""

    def __init__(self, fingerprints: dict[str, str]):
        listing = "; ".join(f"{endpoint}: {fp[:16]}" for endpoint, fp in fingerprints.items())
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION,
                         f"the servers hold different models ({listing}); start every server with the same "
                         f"GGUF file, or give the client only the servers that share one")
        self.fingerprints = fingerprints


def _raise(error: grpc.RpcError):
    raise LmscopeError(error.code(), error.details() or "") from None


def split_run_request(request: pb.RunRequest, size: int | None = None) -> list[pb.RunRequest] | None:
    """The request's prompts in parts of `size` (default: two halves), each part with the request's options
    and the interventions that reach its prompts (`sequences` renumbered from 0); None for one prompt."""
    n = len(request.prompts)
    if n < 2:
        return None
    size = size or (n + 1) // 2
    parts = []
    for start in range(0, n, size):
        stop = min(n, start + size)
        part = pb.RunRequest()
        part.CopyFrom(request)
        part.ClearField("prompts")
        part.ClearField("interventions")
        part.prompts.extend(request.prompts[start:stop])
        for edit in request.interventions:
            if edit.sequences:
                mine = [s - start for s in edit.sequences if start <= s < stop]
                if not mine:
                    continue
                renumbered = part.interventions.add()
                renumbered.CopyFrom(edit)
                renumbered.sequences[:] = mine
            else:
                part.interventions.append(edit)
        parts.append(part)
    return parts


class _BearerToken(grpc.AuthMetadataPlugin):
    def __init__(self, token: str):
        self._token = token

    def __call__(self, context, callback):
        callback((("authorization", f"Bearer {self._token}"),), None)


def _channel(servers: ServerSet, token: str | None, root_certificates: bytes | None, tls: bool,
             max_message_bytes: int, tls_server_name: str | None = None) -> grpc.Channel:
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.service_config", service_config()),
               # A server host that vanishes without closing its connections (power, network) is noticed
               # within ~30 s instead of at the next TCP timeout, and its calls fail over.
               ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000)]
    if tls or root_certificates is not None:
        server_name = tls_server_name or servers.authority
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        if token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.metadata_call_credentials(_BearerToken(token)))
        return grpc.secure_channel(servers.target, credentials, options=options)
    channel = grpc.insecure_channel(servers.target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Bearer token on a plain-text channel (loopback or a trusted network); TLS uses call credentials."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return details._replace(metadata=list(details.metadata or []) + [self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class CoreClient:
    """Connection to one lmscope server, or several serving the same model.

    address: "host:port"; a list of them (or one comma-separated string); "dns:///name:port" for a name with
        several records (see `lmscope.client.servers`). With several servers, calls are balanced over them
        (gRPC round_robin) and the first `model_info()` checks that they all hold the same model.
    max_in_flight: batch requests outstanding at once (`iter_runs`, `run_batch`, `embed`); default twice
        the worker processes of all servers, so no worker waits for the network between requests.
    retries: times a batch request is sent again when its server fails (UNAVAILABLE).
    tls_server_name: the name to check server certificates against when it is not the address dialled.
    shared_memory: take Run answers from a file shared with the server instead of the stream
        (`lmscope.proto.shared_memory`; Linux). None (default): when every server is on this host (loopback
        addresses, a Unix socket); a server that cannot use it streams the answer and the client stops
        offering it. False: never; True: to any server.
    """

    def __init__(self, address: str | Sequence[str] = DEFAULT_ADDRESS, *, token: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None, timeout: float | None = None,
                 max_message_mb: int = 64, max_in_flight: int | None = None, retries: int = 3,
                 tls_server_name: str | None = None, shared_memory: bool | None = None):
        self.address = address
        self.servers = ServerSet.parse(address)
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.retries = retries
        token = token or os.environ.get("LMSCOPE_TOKEN")
        self._connect = lambda servers: _channel(servers, token, root_certificates, tls, max_message_mb << 20,
                                                 tls_server_name)
        self._channel = self._connect(self.servers)
        self._stub = pb_grpc.InspectorStub(self._channel)
        self._info: ModelInfo | None = None
        self._n_workers = 1
        self._share_answers = shared.SUPPORTED and (self.servers.local if shared_memory is None else shared_memory)

    # ----- plumbing --------------------------------------------------------------------------------

    @property
    def answers_in_shared_memory(self) -> bool:
        """Whether Run answers are offered a file shared with the server (`shared_memory=`); False from the
        first refusal on."""
        return self._share_answers

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, request):
        """One unary RPC by its name in the proto (``"Tokenize"``); a refusal raises `LmscopeError`."""
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as error:
            _raise(error)

    def _stream(self, method: str, request, metadata=None) -> Iterator:
        try:
            yield from getattr(self._stub, method)(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as error:
            _raise(error)

    def _tensor_stream(self, method: str, request, metadata=None):
        header = None
        assembler = tensors.Assembler()
        for chunk in self._stream(method, request, metadata):
            if chunk.HasField("header"):
                header = chunk.header
            else:
                assembler.add(chunk.tensor)
        return header, assembler.arrays()

    # ----- model -----------------------------------------------------------------------------------

    def model_info(self, refresh: bool = False) -> ModelInfo:
        """The served model. With several servers, the first call asks each one and raises
        `ModelMismatchError` unless every server that answers holds the same file (same sha256)."""
        if self._info is None or refresh:
            info = ModelInfo.from_proto(self.call("GetModelInfo", pb.ModelInfoRequest()))
            self._n_workers = self._check_same_model(info) if len(self.servers.endpoints) > 1 \
                else max(info.n_workers, 1)
            self._info = info
        return self._info

    def _check_same_model(self, info: ModelInfo) -> int:
        """Ask every server on a channel of its own (all at once); return their total worker count.

        A server that does not answer is left out of the check (the balancer leaves it out of the rotation
        too) with a warning; it is not checked when it comes back later.
        """
        def ask(endpoint: str):
            channel = self._connect(ServerSet(endpoint, (endpoint,), self.servers.authority))
            try:
                return pb_grpc.InspectorStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout or 30)
            except grpc.RpcError as error:
                log.warning("server %s did not answer the same-model check (%s: %s)", endpoint,
                            error.code().name, error.details())
                return None
            finally:
                channel.close()

        with ThreadPoolExecutor(len(self.servers.endpoints)) as pool:
            replies = dict(zip(self.servers.endpoints, pool.map(ask, self.servers.endpoints)))
        fingerprints = {endpoint: reply.fingerprint for endpoint, reply in replies.items() if reply is not None}
        if len(set(fingerprints.values()) | {info.fingerprint}) > 1:
            raise ModelMismatchError(fingerprints)
        return max(sum(max(reply.n_workers, 1) for reply in replies.values() if reply is not None), 1)

    @property
    def n_layer(self) -> int:
        return self.model_info().n_layer

    def sites(self, selection: SiteFilter = "*") -> list[str]:
        """Capture-site names of the loaded model chosen by a filter (name, glob, list or predicate)."""
        info = self.model_info()
        try:
            return select_sites(info.capture_sites, selection, info.unavailable_sites)
        except (KeyError, TypeError) as exc:  # the service shares select_sites and maps these itself
            raise invalid_argument(str(exc.args[0])) from None

    # ----- tokens ----------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False,
                 chat: bool = False) -> Tokens:
        response = self.call("Tokenize", pb.TokenizeRequest(text=text, add_special=add_special,
                                                            parse_special=parse_special, chat=chat))
        return Tokens(list(response.token_ids), list(response.pieces), response.text)

    def detokenize(self, token_ids: Iterable[int]) -> str:
        return self.call("Detokenize", pb.DetokenizeRequest(token_ids=[int(t) for t in token_ids])).text

    def token_pieces(self, ids: Iterable[int]) -> list[bytes]:
        """The raw bytes of each token id, in order: Detokenize requests of at most the server's
        `max_prompt_tokens` ids each. Every piece the client looks up on the user's behalf comes from here."""
        ids = [int(t) for t in ids]
        step = self.model_info().limits.get("max_prompt_tokens") or len(ids) or 1
        pieces: list[bytes] = []
        for start in range(0, len(ids), step):
            pieces += self.call("Detokenize", pb.DetokenizeRequest(token_ids=ids[start:start + step])).pieces
        return pieces

    def token_id(self, text: str) -> int:
        """The first token of `text` (no BOS): how a multi-token word is reduced to one id."""
        ids = self.tokenize(text, add_special=False).token_ids
        if not ids:
            raise invalid_argument(f"{text!r} tokenizes to nothing")
        return ids[0]

    # ----- forward passes --------------------------------------------------------------------------

    @staticmethod
    def _prompt(prompt, chat: bool = False, prepend_bos: bool = True) -> pb.Prompt:
        if isinstance(prompt, str):
            return pb.Prompt(text=prompt, chat=chat, no_bos=not prepend_bos)
        # chat travels with token ids too: the server refuses that pair (INVALID_ARGUMENT) rather than the
        # client dropping chat and running a different prompt than the one asked for.
        return pb.Prompt(token_ids=[int(t) for t in prompt], chat=chat)

    def check_layer(self, layer, what: str = "layer") -> int:
        """A block index of the served model; OUT_OF_RANGE (`LmscopeError`) otherwise."""
        return check_layer(layer, self.n_layer, what)

    def _capture_selection(self, layers, capture) -> list[str]:
        if capture is not None:
            return [capture] if isinstance(capture, str) else (
                self.sites(capture) if callable(capture) else list(capture))
        if layers is None:
            return ["embed", "blocks.*.resid_post"]
        return [f"blocks.{self.check_layer(L)}.resid_post" for L in layers]

    def run_request(self, prompts, *, layers=None, capture=None, positions=None, logits=True,
                    dtype="float32", steer=None, ablate=None, patch=None, interventions=None, chat=False,
                    prepend_bos=True, lens: pb.LensSpec | None = None, fidelity: bool = False) -> pb.RunRequest:
        """The RunRequest `run` would send for these prompts (options as for `run`), for `send_run`."""
        modes = {True: pb.LOGITS_ALL, "all": pb.LOGITS_ALL, "last": pb.LOGITS_LAST,
                 False: pb.LOGITS_NONE, None: pb.LOGITS_NONE, "none": pb.LOGITS_NONE}
        if not isinstance(logits, (bool, str, type(None))) or logits not in modes:
            raise invalid_argument(f"logits must be True, 'all', 'last' or False, not {logits!r}")
        mode = modes[logits]
        if dtype not in ("float32", "float16"):
            raise invalid_argument(f"dtype must be 'float32' or 'float16', not {dtype!r}")
        needs_layers = steer is not None or ablate is not None
        return pb.RunRequest(
            prompts=[self._prompt(p, chat, prepend_bos) for p in prompts],
            capture=self._capture_selection(layers, capture),
            positions=[int(p) for p in positions] if positions is not None else [],
            logits=mode, dtype=pb.FLOAT16 if dtype == "float16" else pb.FLOAT32,
            interventions=iv.build(self.n_layer if needs_layers else 0, steer, ablate, patch, interventions),
            lens=lens, fidelity=bool(fidelity))

    def send_run(self, request: pb.RunRequest, metadata=None) -> list[Run]:
        """Send a RunRequest (from `run_request`, possibly with a lens spec); one Run per prompt."""
        if not self._share_answers:
            header, arrays = self._tensor_stream("Run", request, metadata)
        else:
            with shared.AnswerFile() as answer_file:
                offered = pb.RunRequest()
                offered.CopyFrom(request)
                offered.shared_memory.CopyFrom(answer_file.offer())
                header, arrays = self._tensor_stream("Run", offered, metadata)
                if header.shared_memory_refused:
                    log.info("shared memory refused by the server (%s): answers come on the stream from now on",
                             header.shared_memory_refused)
                    self._share_answers = False
                arrays.update(answer_file.arrays(header.placements))
        runs = []
        for s, seq in enumerate(header.sequences):
            captures = {site: arrays[(site, s)] for site in header.sites if (site, s) in arrays}
            extra = {name: a for (name, seq_index), a in arrays.items()
                     if seq_index == s and name not in captures and name != "logits"}
            runs.append(Run(token_ids=list(seq.token_ids), positions=list(seq.positions),
                            logits=arrays.get(("logits", s)), captures=captures, extra=extra,
                            decode_ms=header.decode_ms, total_ms=header.total_ms, n_ubatches=header.n_ubatches,
                            n_layer=self.n_layer))
        return runs

    def run(self, prompt, *, layers: Sequence[int] | None = None, capture: SiteFilter | None = None,
            positions: Sequence[int] | None = None, logits: bool | str = True, dtype: str = "float32",
            steer=None, ablate=None, patch=None, interventions=None, chat: bool = False,
            prepend_bos: bool = True, fidelity: bool = False) -> Run:
        """One forward pass. By default captures every hidden state and returns logits for every token.

        layers: capture only these blocks' outputs (``blocks.L.resid_post``).
        capture: any sites instead (name, glob, list or predicate; see `lmscope.proto.sites`).
        positions: token positions to return (negative from the end); default all.
        logits: True / "all", "last", or False.
        dtype: "float32" or "float16" on the wire (results are float16 arrays then).
        steer / ablate / patch / interventions: edits of the forward pass (`lmscope.client.interventions`).
        chat: wrap a text prompt in the model's chat template (the server refuses it with token ids:
            INVALID_ARGUMENT).
        prepend_bos: False leaves out the BOS token the tokenizer would add to a text prompt (token-id
            prompts are used as given).
        fidelity: also compute the fidelity map of the run (`Run.fidelity`, `lmscope.client.fidelity`): where
            llama.cpp's rounding of matrix-product inputs moves each block's output.
        """
        request = self.run_request([prompt], layers=layers, capture=capture, positions=positions, logits=logits,
                                   dtype=dtype, steer=steer, ablate=ablate, patch=patch,
                                   interventions=interventions, chat=chat, prepend_bos=prepend_bos,
                                   fidelity=fidelity)
        return self.send_run(request)[0]

    def send_runs(self, requests: Iterable[pb.RunRequest], *,
                  describe: Callable[[int], str] | None = None) -> Iterator[Run]:
        """Send RunRequests (from `run_request`) with up to `max_in_flight` outstanding over all servers; each
        prompt's Run, in request and prompt order. Every batch of prompts goes through here.

        A request with more prompts than the server's `max_batch_prompts` is sent in parts of that size; one the
        server refuses with RESOURCE_EXHAUSTED (an answer over `max_capture_bytes`, a message too large) is sent
        again in halves, recursively, so the results do not depend on how the prompts were grouped; a single
        prompt still too big raises the server's error. A request whose server fails is sent again (see
        `lmscope.client.dispatch`). Only the window of outstanding requests is held in memory.
        `describe(i)` names request i in log messages.
        """
        info = self.model_info()
        limit = info.limits.get("max_batch_prompts") or 0

        def fitting() -> Iterator[pb.RunRequest]:
            for request in requests:
                if limit and len(request.prompts) > limit:
                    yield from split_run_request(request, limit)
                else:
                    yield request

        window = self.max_in_flight or 2 * self._n_workers
        for runs in ordered_calls(self.send_run, fitting(), max_in_flight=window, retries=self.retries,
                                  describe=describe or (lambda i: f"{info.name}: request {i}"),
                                  split=split_run_request):
            yield from runs

    def iter_runs(self, prompts: Iterable, *, batch_size: int = 64, **options) -> Iterator[Run]:
        """`run_batch` as a stream: each prompt's Run in prompt order, while later requests are running.

        Requests of `batch_size` prompts (decoded together by one server) go through `send_runs`: spread over
        the servers, cut to the server's `max_batch_prompts`, split when an answer would be too big.
        """
        batch_size = check_batch_size(batch_size)
        prompts = list(prompts)
        requests = [self.run_request(prompts[start:start + batch_size], **options)
                    for start in range(0, len(prompts), batch_size)]
        name = self.model_info().name
        return self.send_runs(requests, describe=lambda i: f"{name}: prompts {i * batch_size}.."
                                                           f"{min((i + 1) * batch_size, len(prompts)) - 1}")

    def run_batch(self, prompts: Sequence, *, batch_size: int = 64, progress: bool = False, **options) -> list[Run]:
        """Many prompts, `batch_size` per request, several requests in flight over all servers, results in
        prompt order (options as for `run`)."""
        from .progress import progress_bar

        prompts = list(prompts)
        runs: list[Run] = []
        with progress_bar(len(prompts), enabled=progress, desc="prompts") as bar:
            for run in self.iter_runs(prompts, batch_size=batch_size, **options):
                runs.append(run)
                bar.update(1)
        return runs

    # ----- vocabulary-side math --------------------------------------------------------------------

    def top_k(self, logits: np.ndarray, k: int = 10, temperature: float = 1.0) -> TopK:
        """The next-token table of one logits row: ids, pieces and probabilities (softmax at `temperature`)."""
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if temperature <= 0:
            raise invalid_argument(f"temperature must be > 0, not {temperature}")
        z = logits / temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        ids = np.argsort(-probs, kind="stable")[:k]
        pieces = self.tokenize_pieces(ids)
        return TopK(ids=ids.astype(np.int64), pieces=pieces, probs=probs[ids], logits=logits[ids])

    def tokenize_pieces(self, ids: Iterable[int]) -> list[str]:
        """The text of each token id (`token_pieces` decoded; a partial UTF-8 sequence shows as U+FFFD)."""
        return [p.decode("utf-8", "replace") for p in self.token_pieces(ids)]

    def unembed(self, vectors: np.ndarray, final_norm: bool = True) -> np.ndarray:
        """Final norm (unless final_norm=False) + LM head applied server-side: logits (n, n_vocab)."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        spec = pb.LensSpec(enabled=True, skip_final_norm=not final_norm, return_logits=True)
        _, arrays = self._tensor_stream("Unembed", pb.UnembedRequest(vectors=tensors.to_tensor(vectors), spec=spec))
        return arrays[("lens.logits", 0)]

    def lens_vectors(self, vectors: np.ndarray, *, top_k: int = 10, temperature: float = 1.0,
                     target_ids: Sequence[int] = (), final_norm: bool = True,
                     kl_reference_rows: int = 0) -> dict[str, np.ndarray]:
        """Server-side lens reduction of vectors: top_ids, top_probs, target_probs, target_ranks, entropy.

        kl_reference_rows = m > 0: the last m vectors are reference distributions (a final layer's), and
        `kl_to_final[i]` is KL(P(vector n - m + i mod m) || P(vector i))."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        spec = pb.LensSpec(enabled=True, top_k=top_k, temperature=temperature, target_ids=list(target_ids),
                           skip_final_norm=not final_norm, kl_reference_rows=kl_reference_rows)
        _, arrays = self._tensor_stream("Unembed", pb.UnembedRequest(vectors=tensors.to_tensor(vectors), spec=spec))
        return {name.removeprefix("lens."): a for (name, _), a in arrays.items()}

    def nearest_token_ids(self, vectors: np.ndarray, k: int = 10, table: str = "embedding",
                          exclude_ids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Server-side cosine nearest neighbours of vectors among the rows of a vocabulary table.

        table: "embedding" (token_embd) or "lm_head". exclude_ids: tokens never returned.
        Returns ids and cosine scores, each (n, k), best first.
        """
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        request = pb.NearestTokensRequest(vectors=tensors.to_tensor(vectors), k=k, table=table,
                                          exclude_ids=[int(t) for t in exclude_ids])
        _, arrays = self._tensor_stream("NearestTokens", request)
        return arrays[("nearest.ids", 0)], arrays[("nearest.scores", 0)]

    def weights(self, name: str, indices: Sequence[int] | None = None, axis: int = 0,
                dtype: str = "float32") -> np.ndarray:
        """A GGUF weight tensor (dequantized), or some of its rows/columns, in numpy order."""
        request = pb.WeightsRequest(name=name, axis=axis, indices=[int(i) for i in indices or []],
                                    dtype=pb.FLOAT16 if dtype == "float16" else pb.FLOAT32)
        _, arrays = self._tensor_stream("GetWeights", request)
        return arrays[("weights", 0)]

    def embedding_rows(self, token_ids: Sequence[int]) -> np.ndarray:
        """Rows of the token embedding table (dequantized): (n, n_embd)."""
        return self.weights("token_embd.weight", list(token_ids), axis=0)

    def embed(self, texts: Sequence[str] | str, pooling: str = "mean", normalize: bool = True,
              batch_size: int = 64):
        """Sentence embeddings from the final-normed last hidden state (what llama.cpp's embeddings are).

        pooling: "mean" (over tokens), "last" (last token), "none" (a list of (n_tokens, n_embd) arrays).
        normalize: L2-normalize each vector.
        """
        if pooling not in ("mean", "last", "none"):
            raise invalid_argument(f"pooling must be 'mean', 'last' or 'none', not {pooling!r}")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        runs = self.run_batch(texts, batch_size=batch_size, capture=["ln_final"], logits=False,
                              positions=[-1] if pooling == "last" else None)
        vectors = []
        for run in runs:
            states = run.captures["ln_final"].astype(np.float32)
            v = states.mean(axis=0) if pooling == "mean" else states[-1] if pooling == "last" else states
            if normalize:
                v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
            vectors.append(v)
        if pooling == "none":
            return vectors[0] if single else vectors
        if not vectors:  # no texts: no rows, as numpy would give
            return np.zeros((0, self.model_info().n_embd), dtype=np.float32)
        stacked = np.stack(vectors)
        return stacked[0] if single else stacked

    # ----- generation ------------------------------------------------------------------------------

    def generate_stream(self, prompt, *, max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                        top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), chat: bool = False,
                        steer=None, ablate=None, patch=None, interventions=None) -> Iterator[pb.GenerateEvent]:
        """Raw generation events as they arrive (start, token..., end)."""
        needs_layers = steer is not None or ablate is not None
        request = pb.GenerateRequest(
            prompt=self._prompt(prompt, chat), max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=list(stop),
            interventions=iv.build(self.n_layer if needs_layers else 0, steer, ablate, patch, interventions))
        yield from self._stream("Generate", request)

    def generate(self, prompt, *, max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), chat: bool = False,
                 steer=None, ablate=None, patch=None, interventions=None, on_token=None) -> Generation:
        """Generate text (greedy at temperature 0). `on_token(text)` is called as tokens stream in."""
        generation = Generation(prompt_token_ids=[], token_ids=[], text="", finish_reason="")
        for event in self.generate_stream(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed, stop=stop, chat=chat, steer=steer,
                                          ablate=ablate, patch=patch, interventions=interventions):
            kind = event.WhichOneof("kind")
            if kind == "start":
                generation.prompt_token_ids = list(event.start.prompt_token_ids)
            elif kind == "token":
                generation.token_ids.append(event.token.id)
                if on_token is not None:
                    on_token(event.token.text)
            else:
                generation.text = event.end.text
                generation.finish_reason = event.end.finish_reason
                generation.prompt_ms = event.end.prompt_ms
                generation.generate_ms = event.end.generate_ms
        return generation
