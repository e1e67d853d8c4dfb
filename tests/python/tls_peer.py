"""Mutual-TLS peers written with Python's own TLS stack (`ssl`, OpenSSL underneath), to
check tern's TLS against an independent implementation.

    tls_peer.py server ADDR CERT KEY CA LOG
        prints "ready"; requires a client certificate chaining to CA; for each connection
        appends "PEER <client URI SAN> ALPN <protocol>" to LOG, then echoes each line back
        as "<client URI SAN> <line>".
    tls_peer.py thrift ADDR CERT KEY CA LOG ID
        the same TLS, serving serial_peer.py's Thrift interface (TThreadedServer, framed).
    tls_peer.py client ADDR CERT KEY CA [--alpn P,Q] [--tls12]
        connects with a client certificate (none for CERT "-"), verifies the server's
        chain against CA, sends "hello", prints JSON: reply, server (its URI SAN), alpn;
        or error.
    tls_peer.py plain ADDR [--again-after S]
        sends "hello" without TLS; prints JSON: reply or error (and, after S seconds on
        the same connection, again: the second reply).
"""
import json
import socket
import ssl
import sys
import threading
import time


def uri_san(cert):
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "URI":
            return value
    return "-"


def server_context(cert, key, ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["istio", "h2", "http/1.1"])
    return ctx


def serve_echo(addr, cert, key, ca, log):
    ctx = server_context(cert, key, ca)
    host, port = addr.rsplit(":", 1)
    lsock = socket.create_server((host, int(port)), reuse_port=False)
    lock = threading.Lock()
    print("ready", flush=True)

    def handle(raw):
        try:
            conn = ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with lock, open(log, "a") as f:
                f.write(f"HANDSHAKE-FAILED {e}\n")
            raw.close()
            return
        peer = uri_san(conn.getpeercert())
        with lock, open(log, "a") as f:
            f.write(f"PEER {peer} ALPN {conn.selected_alpn_protocol()}\n")
        with conn:
            buf = b""
            while True:
                try:
                    data = conn.recv(4096)
                except (ssl.SSLError, OSError):
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    conn.sendall(peer.encode() + b" " + line + b"\n")

    while True:
        raw, _ = lsock.accept()
        threading.Thread(target=handle, args=(raw,), daemon=True).start()


def serve_thrift(addr, cert, key, ca, log, ident):
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolFactory
    from thrift.server.TServer import TThreadedServer
    from thrift.transport.TSSLSocket import TSSLServerSocket
    from thrift.transport.TTransport import TFramedTransportFactory

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from serial_peer import Processor

    host, port = addr.rsplit(":", 1)
    ctx = server_context(cert, key, ca)
    # Identities are SPIFFE URIs: no host name to match the client against.
    sock = TSSLServerSocket(host=host, port=int(port), ssl_context=ctx,
                            validate_callback=lambda cert, hostname: None)

    accept = sock.accept

    def logged_accept():
        client = accept()
        if client is not None:
            with open(log, "a") as f:
                f.write(f"PEER {uri_san(client.handle.getpeercert())}\n")
        return client

    sock.accept = logged_accept
    server = TThreadedServer(Processor(ident), sock, TFramedTransportFactory(), TBinaryProtocolFactory(), daemon=True)
    sock.listen()
    sock.listen = lambda: None
    print("ready", flush=True)
    server.serve()


def client(addr, cert, key, ca, alpn, tls12=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    if cert != "-":
        ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    host, port = addr.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with ctx.wrap_socket(raw) as conn:
                conn.sendall(b"hello\n")
                reply = conn.recv(4096).decode()
                if not reply:
                    print(json.dumps({"error": "closed"}))
                    return
                print(json.dumps({
                    "reply": reply.strip(),
                    "server": uri_san(conn.getpeercert()),
                    "alpn": conn.selected_alpn_protocol(),
                }))
    except (OSError, ssl.SSLError) as e:
        print(json.dumps({"error": str(e)}))


def plain(addr, again_after):
    host, port = addr.rsplit(":", 1)
    out = {}
    try:
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            for key in ["reply", "again"] if again_after else ["reply"]:
                if key == "again":
                    time.sleep(again_after)
                conn.sendall(b"hello\n")
                reply = conn.recv(4096).decode()
                if not reply:
                    out["error"] = "closed"
                    break
                out[key] = reply.strip()
    except OSError as e:
        out["error"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "server":
        serve_echo(*args[:5])
    elif cmd == "thrift":
        serve_thrift(*args[:6])
    elif cmd == "client":
        alpn = args[args.index("--alpn") + 1].split(",") if "--alpn" in args else None
        client(*args[:4], alpn, "--tls12" in args)
    elif cmd == "plain":
        plain(args[0], float(args[args.index("--again-after") + 1]) if "--again-after" in args else 0)
