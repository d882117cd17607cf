"""The one exception type for a request the server refuses or cannot complete.

`code` is the name of a `grpc.StatusCode` (a string, so the exception pickles across the worker pipe and
this module needs no grpc import); `message` says what to fix.
"""


class RequestError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
