"""Host and port as one address string, the way both sides write them (gRPC targets, log lines)."""


def join_host_port(host: str, port: int) -> str:
    """"host:port", with an IPv6 host in brackets ("[::1]:50051")."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
