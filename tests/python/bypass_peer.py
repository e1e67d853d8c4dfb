"""An attacker of Thrift-method rules, and a server as generated processors are: Apache
Thrift's Python library, whose processors dispatch on the method name and ignore the message
type, and whose binary protocol reads old non-strict messages.

    bypass_peer.py serve ADDR LOG [--non-strict]
        a TThreadedServer that appends every method it runs to LOG, one per line, and
        answers it; THeader (any transform, framed or unframed binary or compact) by
        default, or unframed non-strict binary; prints "ready"
    bypass_peer.py send ADDR MODE METHOD
        one message named METHOD, framed as MODE says:
          call       framed strict binary CALL (what tern decodes)
          reply      framed strict binary, type REPLY
          exception  framed strict binary, type EXCEPTION
          non-strict unframed binary without a version word, CALL
          zlib       THeader with the zlib transform, CALL
        prints JSON: {"answered": bytes received before the peer closed or 3 s passed}
    bypass_peer.py session ADDR N INTERVAL_MS METHOD
        N framed binary calls of METHOD on one connection, INTERVAL_MS apart; prints JSON:
        {"outcomes": ["ran" | "denied" | "closed", ...]}
    bypass_peer.py hold ADDR SECONDS
        a line-echo session (the test peer greets first) kept busy for SECONDS; prints
        JSON: {"echoes": n, "closed": whether the connection was closed under it}
    bypass_peer.py bulk ADDR SECONDS
        the same session with 64 KiB lines sent without pause (a bulk transfer both ways)
        for SECONDS; prints JSON: {"sent": bytes, "received": bytes echoed, "closed":
        whether the connection was closed under it, "stalled": whether it stopped moving
        without being closed}
    bypass_peer.py flood ADDR N SIZE SECONDS
        N connections each send a framed binary CALL whose SIZE-byte frame lacks its last
        byte, and hold it for SECONDS; prints JSON: {"closed": how many the peer closed}
"""
import json
import socket
import struct
import sys
import threading

from thrift.Thrift import TMessageType, TType
from thrift.protocol.TBinaryProtocol import TBinaryProtocol, TBinaryProtocolFactory
from thrift.protocol.THeaderProtocol import THeaderProtocol, THeaderProtocolFactory
from thrift.server.TServer import TThreadedServer
from thrift.transport.THeaderTransport import THeaderClientType, THeaderTransformID
from thrift.transport.TSocket import TServerSocket
from thrift.transport.TTransport import TBufferedTransportFactory, TMemoryBuffer

LOCK = threading.Lock()


class Processor:
    def __init__(self, log):
        self.log = log

    def process(self, iprot, oprot):
        name, _kind, seq = iprot.readMessageBegin()
        iprot.skip(TType.STRUCT)
        iprot.readMessageEnd()
        with LOCK, open(self.log, "a") as f:
            f.write(name + "\n")
        oprot.writeMessageBegin(name, TMessageType.REPLY, seq)
        oprot.writeStructBegin("result")
        oprot.writeFieldBegin("success", TType.STRING, 0)
        oprot.writeString("ran " + name)
        oprot.writeFieldEnd()
        oprot.writeFieldStop()
        oprot.writeStructEnd()
        oprot.writeMessageEnd()
        oprot.trans.flush()
        return True


def serve(addr, log, non_strict):
    host, port = addr.rsplit(":", 1)
    sock = TServerSocket(host=host, port=int(port))
    if non_strict:
        proto = TBinaryProtocolFactory(strictRead=False, strictWrite=False)
    else:
        proto = THeaderProtocolFactory(
            allowed_client_types=(
                THeaderClientType.HEADERS,
                THeaderClientType.FRAMED_BINARY,
                THeaderClientType.UNFRAMED_BINARY,
                THeaderClientType.FRAMED_COMPACT,
                THeaderClientType.UNFRAMED_COMPACT,
            )
        )
    server = TThreadedServer(Processor(log), sock, TBufferedTransportFactory(), proto, daemon=True)
    sock.listen()
    sock.listen = lambda: None  # serve() would bind again
    print("ready", flush=True)
    server.serve()


def message(mode, method):
    """The bytes of one `method` message with an empty argument struct."""
    kind = {"reply": TMessageType.REPLY, "exception": TMessageType.EXCEPTION}.get(mode, TMessageType.CALL)
    if mode == "zlib":
        buf = TMemoryBuffer()
        proto = THeaderProtocol(buf, [THeaderClientType.HEADERS])
        proto.trans.add_transform(THeaderTransformID.ZLIB)
        proto.writeMessageBegin(method, kind, 1)
        proto.writeStructBegin("args")
        proto.writeFieldStop()
        proto.writeStructEnd()
        proto.writeMessageEnd()
        proto.trans.flush()
        return buf.getvalue()
    buf = TMemoryBuffer()
    proto = TBinaryProtocol(buf, strictRead=False, strictWrite=(mode != "non-strict"))
    proto.writeMessageBegin(method, kind, 1)
    proto.writeStructBegin("args")
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    body = buf.getvalue()
    if mode == "non-strict":
        return body
    return struct.pack(">i", len(body)) + body


def send(addr, mode, method):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=3)
    s.settimeout(3)
    answered = 0
    try:
        s.sendall(message(mode, method))
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answered += len(chunk)
    except OSError:
        pass
    print(json.dumps({"answered": answered}), flush=True)


def read_frame(s):
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    (length,) = struct.unpack(">i", exactly(4))
    return exactly(length)


def session(addr, n, interval_ms, method):
    import time

    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    outcomes = []
    for _ in range(n):
        try:
            s.sendall(message("call", method))
            frame = read_frame(s)
            buf = TMemoryBuffer(frame)
            _name, kind, _seq = TBinaryProtocol(buf).readMessageBegin()
            outcomes.append("ran" if kind == TMessageType.REPLY else "denied")
        except (OSError, EOFError):
            outcomes.append("closed")
        time.sleep(interval_ms / 1000)
    print(json.dumps({"outcomes": outcomes}), flush=True)


def hold(addr, seconds):
    import time

    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=2)
    f = s.makefile("rwb")
    echoes, closed = 0, False
    deadline = time.time() + seconds
    try:
        if not f.readline():
            raise EOFError
        while time.time() < deadline:
            f.write(b"x\n")
            f.flush()
            if f.readline() != b"x\n":
                raise EOFError
            echoes += 1
            time.sleep(0.05)
    except (OSError, EOFError):
        closed = True
    print(json.dumps({"echoes": echoes, "closed": closed}), flush=True)


def bulk(addr, seconds):
    import time

    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=2)
    line = b"x" * (64 * 1024 - 1) + b"\n"
    counts = {"sent": 0, "received": 0, "closed": False, "stalled": False}

    def writer():
        try:
            while True:
                s.sendall(line)
                counts["sent"] += len(line)
        except OSError:
            pass

    deadline = time.time() + seconds
    try:
        greeting = b""
        while not greeting.endswith(b"\n"):
            chunk = s.recv(1)
            if not chunk:
                raise EOFError
            greeting += chunk
        threading.Thread(target=writer, daemon=True).start()
        while time.time() < deadline:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise EOFError
            counts["received"] += len(chunk)
    except socket.timeout:
        counts["stalled"] = True
    except (OSError, EOFError):
        counts["closed"] = True
    print(json.dumps(counts), flush=True)


def flood(addr, n, size, seconds):
    import time

    host, port = addr.rsplit(":", 1)
    # A valid call header, then a binary field that fills the frame.
    head = TMemoryBuffer()
    proto = TBinaryProtocol(head)
    proto.writeMessageBegin("echo", TMessageType.CALL, 1)
    proto.writeStructBegin("args")
    proto.writeFieldBegin("data", TType.STRING, 1)
    head = head.getvalue()
    body_len = size - len(head) - 4 - 1  # the string's length word, the struct's stop
    frame = struct.pack(">i", size) + head + struct.pack(">i", body_len)
    chunk = b"x" * 65536
    socks, closed = [], 0

    def one():
        nonlocal closed
        try:
            s = socket.create_connection((host, int(port)), timeout=10)
            socks.append(s)
            s.sendall(frame)
            left = body_len  # the stop byte is never sent
            while left > 0:
                part = chunk[: min(left, len(chunk))]
                s.sendall(part)
                left -= len(part)
        except OSError:
            with LOCK:
                closed += 1

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(seconds)
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                with LOCK:
                    closed += 1
        except BlockingIOError:
            pass
        except OSError:
            with LOCK:
                closed += 1
    print(json.dumps({"closed": closed}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], "--non-strict" in sys.argv[4:])
    elif sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "session":
        session(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "flood":
        flood(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    elif sys.argv[1] == "hold":
        hold(sys.argv[2], float(sys.argv[3]))
    elif sys.argv[1] == "bulk":
        bulk(sys.argv[2], float(sys.argv[3]))
