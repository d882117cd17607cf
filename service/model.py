"""One loaded llama.cpp model: its handle, dimensions, metadata and vocabulary.

Everything here is read-only once the model is loaded, and independent of contexts: tokenizing, turning
tokens into pieces, applying the chat template and reading GGUF metadata need no KV cache, so they live
apart from decoding (`service/batching.py`).
"""
from __future__ import annotations

import ctypes

from . import llama_log, llama_rpc
from .errors import Code, RequestError
from .native import llama as lc


class Model:
    def __init__(self, path: str, n_gpu_layers: int = 0, rpc_servers: tuple[str, ...] = ()):
        self.path = path
        llama_log.install()
        lc.llama_backend_init()
        if rpc_servers:
            llama_rpc.add_devices(list(rpc_servers))
        params = lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        llama_log.clear()
        self.handle = lc.llama_model_load_from_file(path.encode(), params)
        if not self.handle:
            raise RequestError(Code.INVALID_ARGUMENT, f"llama.cpp could not load the model {path}: "
                                                   f"{llama_log.recent_problems() or 'no reason given'}")
        self.vocab = lc.llama_model_get_vocab(self.handle)
        self.n_layer = lc.llama_model_n_layer(self.handle)
        self.n_embd = lc.llama_model_n_embd(self.handle)
        self.n_head = lc.llama_model_n_head(self.handle)
        self.n_head_kv = lc.llama_model_n_head_kv(self.handle)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lc.llama_model_n_ctx_train(self.handle)
        self.n_params = lc.llama_model_n_params(self.handle)
        self.bos = lc.llama_vocab_bos(self.vocab)
        self.eos = lc.llama_vocab_eos(self.vocab)

    def close(self) -> None:
        if self.handle:
            lc.llama_model_free(self.handle)
            self.handle = None

    # ----- metadata -------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = lc.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        tmpl = lc.llama_model_chat_template(self.handle, None)
        return tmpl.decode("utf-8", "replace") if tmpl else None

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self.handle, buf, len(buf))
        return buf.value.decode()

    # ----- vocabulary -------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        capacity = len(raw) + 16
        while True:
            buf = (lc.llama_token * capacity)()
            n = lc.llama_tokenize(self.vocab, raw, len(raw), buf, capacity, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    def piece(self, token: int, special: bool = True) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t, special=False) for t in tokens).decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    def apply_chat_template(self, user_text: str) -> str:
        template = lc.llama_model_chat_template(self.handle, None)
        if not template:
            raise RequestError(Code.FAILED_PRECONDITION, "this model has no chat template; send chat=false")
        role, content = b"user", user_text.encode("utf-8")
        messages = (lc.llama_chat_message * 1)(lc.llama_chat_message(role=role, content=content))
        size = len(content) * 2 + 512
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_chat_apply_template(template, messages, 1, True, buf, size)
            if n < 0:
                raise RequestError(Code.FAILED_PRECONDITION, "llama.cpp does not support this model's chat template")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n

    def prompt_tokens(self, text: str, chat: bool, bos: bool = True) -> list[int]:
        if chat:
            return self.tokenize(self.apply_chat_template(text), add_special=bos, parse_special=True)
        return self.tokenize(text, add_special=bos, parse_special=False)
