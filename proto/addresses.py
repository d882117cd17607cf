"""Host and port as one address string, the way both sides write them (gRPC targets, log lines), and which
hosts are this machine's loopback."""
import ipaddress


def join_host_port(host: str, port: int) -> str:
    """"host:port", with an IPv6 host in brackets ("[::1]:50051")."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    """"localhost" or a loopback address ("127.0.0.1", "::1", "[::1]", "::ffff:127.0.0.1"); not a name or ""."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
