"""The contract the server and the client share, and nothing else: the wire (`lmscope.proto` the `.proto`
file, `wire/` its generated stubs), the tensor codec (`tensors`), the capture-site names and shapes
(`sites`), the GGUF reader and tensor names (`gguf_file`, `tensor_names`) and address formatting
(`addresses`).

`lmscope.service` and `lmscope.client` import this package and never each other (tests/unit/test_layers.py
checks it); this package imports neither. Its modules are light (numpy and protobuf; gRPC only in
`wire/lmscope_pb2_grpc`), so the server's model workers load them without gRPC, plotting or scikit-learn.
"""
