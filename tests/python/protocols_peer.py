"""Peers of protocols that are not Thrift, to show that tern's Thrift detection leaves them alone.
Python's own sockets and `ssl` (OpenSSL), independent of tern.

    protocols_peer.py serve ADDR greeter|echo|tls [CERT KEY]   prints "ready"
        greeter: a server-first protocol (SMTP-like): "220 ..." at once, then echoes
        echo:    echoes whatever arrives
        tls:     a TLS server (CERT, KEY) that echoes what it decrypts
    protocols_peer.py greet ADDR          ms until the greeting arrives, with nothing sent first
    protocols_peer.py hellos ADDR         TLS ClientHello records of every length 0x0100-0x01ff
                                          (every low byte); each must come back unchanged
    protocols_peer.py echo ADDR HEX       sends bytes; they must come back unchanged
    protocols_peer.py tls ADDR CA NAME    a real TLS handshake and an echo through it
Each client prints one JSON line.
"""
import json
import socket
import ssl
import sys
import threading
import time


def listen(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(256)
    return s


def echo_loop(conn):
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close()


def serve(addr, kind, cert=None, key=None):
    listener = listen(addr)
    ctx = None
    if kind == "tls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()

        def handle(conn=conn):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if kind == "greeter":
                conn.sendall(b"220 mail.example ESMTP ready\r\n")
            elif kind == "tls":
                try:
                    conn = ctx.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()
                    return
            echo_loop(conn)

        threading.Thread(target=handle, daemon=True).start()


def connect(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_exactly(s, n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def greet(addr):
    s = connect(addr)
    started = time.monotonic()
    line = s.recv(1024)
    ms = (time.monotonic() - started) * 1000
    s.sendall(b"EHLO tern\r\n")
    echoed = read_exactly(s, 11)
    print(json.dumps({"ms": ms, "greeting": line.decode(errors="replace"), "echoed": echoed == b"EHLO tern\r\n"}))


def client_hello(length):
    """A TLS 1.2-style record carrying a ClientHello, `length` bytes of record body."""
    body = bytes([0x01]) + (length - 4).to_bytes(3, "big") + bytes([0x03, 0x03])
    body += bytes(range(256))[: length - len(body)].ljust(length - len(body), b"\0")
    return bytes([0x16, 0x03, 0x01]) + length.to_bytes(2, "big") + body


def hellos(addr):
    failed = []
    for length in range(0x100, 0x200):
        record = client_hello(length)
        try:
            s = connect(addr)
            s.sendall(record)
            back = read_exactly(s, len(record))
            s.close()
            if back != record:
                failed.append(length)
        except OSError:
            failed.append(length)
    print(json.dumps({"sent": 256, "failed": failed}))


def echo(addr, hexbytes):
    data = bytes.fromhex(hexbytes)
    s = connect(addr)
    s.sendall(data)
    back = read_exactly(s, len(data))
    print(json.dumps({"same": back == data, "sent": len(data), "back": len(back)}))


def tls(addr, ca, name):
    ctx = ssl.create_default_context(cafile=ca)
    s = ctx.wrap_socket(connect(addr), server_hostname=name)
    s.sendall(b"hello over tls")
    back = read_exactly(s, 14)
    print(json.dumps({"version": s.version(), "echoed": back == b"hello over tls"}))


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    try:
        {"serve": serve, "greet": greet, "hellos": hellos, "echo": echo, "tls": tls}[cmd](*rest)
    except OSError as e:
        print(json.dumps({"error": str(e)}))
