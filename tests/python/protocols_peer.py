"""Peers of protocols that are not Thrift, to show that tern's Thrift detection leaves them alone.
Python's own sockets and `ssl` (OpenSSL), independent of tern.

    protocols_peer.py serve ADDR greeter|echo|tls [CERT KEY]   prints "ready"
        greeter: a server-first protocol (SMTP-like): "220 ..." at once, then echoes
        echo:    echoes whatever arrives
        tls:     a TLS server (CERT, KEY) that echoes what it decrypts
        stalled: accepts connections and never reads from them
        mirror:  a framed binary Thrift server that answers every call with a REPLY carrying
                 the call's own bytes (a reply as large as its call)
        inflate: a framed binary Thrift server that answers every call with a 1 MiB REPLY
        swell:   a framed binary Thrift server that answers every call with a 12 KiB REPLY,
                 except calls named "hang", which it never answers
        twice:   a framed binary Thrift server that writes every reply twice: a call's REPLY
                 (the call's own bytes) goes out again just ahead of the next call's
    protocols_peer.py greet ADDR          ms until the greeting arrives, with nothing sent first
    protocols_peer.py hellos ADDR         TLS ClientHello records of every length 0x0100-0x01ff
                                          (every low byte); each must come back unchanged
    protocols_peer.py echo ADDR HEX       sends bytes; they must come back unchanged
    protocols_peer.py tls ADDR CA NAME    a real TLS handshake and an echo through it
    protocols_peer.py oneways ADDR N SIZE SECONDS
                                          N framed binary one-way calls of SIZE bytes on one
                                          connection, for at most SECONDS; how many were written
    protocols_peer.py names ADDR N        N calls with distinct method names (framed binary,
                                          pipelined), reading every reply
    protocols_peer.py idle ADDR CONNS SECONDS [HEX]
                                          CONNS connections that send nothing (or only HEX,
                                          the start of a message); how many the server closed
                                          within 1 s of the last connect, and within SECONDS
                                          (times from the first connect)
    protocols_peer.py stall ADDR CALLS SECONDS
                                          CALLS framed binary calls, pipelined; reads nothing
                                          for SECONDS, then reads until the server closes (or
                                          5 s pass with nothing): the bytes, and whether closed
    protocols_peer.py tags ADDR CONNS ROUNDS
                                          CONNS connections take turns calling, one call at a
                                          time, ROUNDS each, every call numbered 0 and carrying
                                          a tag of its own; how many replies carried the
                                          call's own tag, another call's, or were exceptions
                                          or lost connections
    protocols_peer.py hoard ADDR CONNS CALLS SIZE SECONDS [FIRST [GAP_MS]]
                                          on each of CONNS connections, CALLS framed binary
                                          calls of SIZE bytes, pipelined (the first named
                                          FIRST, if given; GAP_MS apart, if given); reads
                                          nothing and holds the connections open for SECONDS
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


stalled = []


def mirror_loop(conn, inflate=None, twice=False):
    """Answers each framed binary call with a REPLY that carries the call's bytes, or, to
    `inflate` to a size, with a string of that size; calls named "hang" get no answer. With
    `twice`, each REPLY of a call's bytes goes out again ahead of the next call's."""
    big = b"\x0b\x00\x00" + (inflate or 0).to_bytes(4, "big") + b"y" * (inflate or 0) + b"\0"
    previous = b""
    try:
        while True:
            head = read_exactly(conn, 4)
            if len(head) < 4:
                break
            body = bytearray(read_exactly(conn, int.from_bytes(head, "big")))
            if len(body) < 4:
                break
            n = int.from_bytes(body[4:8], "big")
            if body[8:8 + n] == b"hang":
                continue
            if inflate:
                seq = int.from_bytes(body[8 + n:12 + n], "big", signed=True)
                conn.sendall(frame(bytes(body[8:8 + n]), 2, seq, big))
                continue
            body[3] = 2
            reply = head + bytes(body)
            conn.sendall(previous + reply)
            if twice:
                previous = reply
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
            elif kind == "stalled":
                stalled.append(conn)
                return
            elif kind in ("mirror", "inflate", "swell", "twice"):
                mirror_loop(conn, {"inflate": 1 << 20, "swell": 12 << 10}.get(kind), kind == "twice")
                return
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


def frame(name, kind, seq, body=b"\0"):
    msg = (0x80010000 | kind).to_bytes(4, "big") + len(name).to_bytes(4, "big") + name
    msg += seq.to_bytes(4, "big", signed=True) + body
    return len(msg).to_bytes(4, "big") + msg


def oneways(addr, n, size, seconds):
    n, size, seconds = int(n), int(size), float(seconds)
    # notify(1: string note)
    note = b"x" * size
    call = frame(b"notify", 4, 0, b"\x0b\x00\x01" + len(note).to_bytes(4, "big") + note + b"\0")
    s = connect(addr)
    s.settimeout(seconds)
    written = 0
    deadline = time.monotonic() + seconds
    try:
        while written < n and time.monotonic() < deadline:
            s.sendall(call)
            written += 1
    except OSError:
        pass
    print(json.dumps({"written": written}))


def names(addr, n):
    n = int(n)
    s = connect(addr)
    s.settimeout(30)
    batch = 500
    replies = 0
    for start in range(0, n, batch):
        calls = b"".join(frame(b"m%d" % i, 1, i) for i in range(start, min(n, start + batch)))
        s.sendall(calls)
        for _ in range(start, min(n, start + batch)):
            length = int.from_bytes(read_exactly(s, 4), "big")
            read_exactly(s, length)
            replies += 1
    print(json.dumps({"replies": replies}))


def tags(addr, conns, rounds):
    conns, rounds = int(conns), int(rounds)
    socks = [None] * conns
    seen = {"own": 0, "foreign": 0, "failed": 0}
    for r in range(rounds):
        for i in range(conns):
            tag = b"tag-%03d-%05d" % (i, r)
            # echo(0: string tag), numbered 0 like every call of Apache Thrift's Python client
            call = frame(b"echo", 1, 0, b"\x0b\x00\x00" + len(tag).to_bytes(4, "big") + tag + b"\0")
            try:
                if socks[i] is None:
                    socks[i] = connect(addr)
                socks[i].sendall(call)
                length = int.from_bytes(read_exactly(socks[i], 4), "big")
                reply = read_exactly(socks[i], length)
                if length == 0 or len(reply) < length:
                    raise OSError("closed")
            except OSError:
                socks[i] = None
                seen["failed"] += 1
                continue
            if reply[3] != 2:
                seen["failed"] += 1
            elif tag in reply:
                seen["own"] += 1
            elif b"tag-" in reply:
                seen["foreign"] += 1
            else:
                seen["failed"] += 1
    print(json.dumps(seen))


def hoard(addr, conns, calls, size, seconds, first="note", gap_ms="0"):
    conns, calls, size, seconds = int(conns), int(calls), int(size), float(seconds)
    gap = float(gap_ms) / 1000
    # note(1: string note)
    note = b"x" * size
    socks = [connect(addr) for _ in range(conns)]
    written = [0] * conns

    def send(i):
        s = socks[i]
        s.settimeout(seconds)
        try:
            for seq in range(calls):
                body = b"\x0b\x00\x01" + len(note).to_bytes(4, "big") + note + b"\0"
                s.sendall(frame(first.encode() if seq == 0 else b"note", 1, seq, body))
                written[i] += 1
                if gap:
                    time.sleep(gap)
        except OSError:
            pass

    threads = [threading.Thread(target=send, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    print(json.dumps({"written": sum(written)}), flush=True)
    for t in threads:
        t.join()


def stall(addr, calls, seconds):
    calls, seconds = int(calls), float(seconds)
    s = connect(addr)
    for seq in range(calls):
        s.sendall(frame(b"note", 1, seq, b"\x0b\x00\x01\x00\x00\x00\x01x\0"))
    time.sleep(seconds)
    s.settimeout(5)
    received, closed = 0, False
    try:
        while True:
            data = s.recv(1 << 20)
            if not data:
                closed = True
                break
            received += len(data)
    except socket.timeout:
        pass
    except OSError:
        closed = True
    print(json.dumps({"bytes": received, "closed": closed}), flush=True)


def idle(addr, conns, seconds, first=""):
    import resource
    import selectors
    conns, seconds, first = int(conns), float(seconds), bytes.fromhex(first)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    watch = selectors.DefaultSelector()
    start = time.monotonic()
    for _ in range(conns):
        s = connect(addr)
        s.sendall(first)
        watch.register(s, selectors.EVENT_READ)
    connected = time.monotonic() - start
    left, closed_at = conns, []
    while left and time.monotonic() - start < seconds:
        for key, _ in watch.select(timeout=0.1):
            try:
                data = key.fileobj.recv(1)
            except OSError:
                data = b""
            if not data:
                closed_at.append(time.monotonic() - start)
                watch.unregister(key.fileobj)
                left -= 1
    print(json.dumps({
        "connecting_took": connected,
        "closed_within_1s": sum(1 for t in closed_at if t < connected + 1.0),
        "closed": len(closed_at),
        "last_closed_after": max(closed_at, default=None),
    }), flush=True)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    try:
        {"serve": serve, "greet": greet, "hellos": hellos, "echo": echo, "tls": tls,
         "oneways": oneways, "names": names, "hoard": hoard, "idle": idle,
         "stall": stall, "tags": tags}[cmd](*rest)
    except OSError as e:
        print(json.dumps({"error": str(e)}))
