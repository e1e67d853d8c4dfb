"""A THeader Thrift peer built on Apache Thrift's Python library, an implementation independent
of tern's and of the Rust `thrift` crate (which has no THeader transport).

    theader_peer.py serve ADDR ID        answers whoami() with ID; prints "ready"
    theader_peer.py call ADDR N [--compact] [--header KEY=VALUE]
                                          N whoami() calls on one connection; prints JSON
"""
import json
import socket
import sys
import threading

from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID
from thrift.transport.TSocket import TSocket


def serve(addr, ident):
    host, port = addr.rsplit(":", 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(128)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=answer, args=(conn, ident), daemon=True).start()


def answer(conn, ident):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = TSocket()
    transport.setHandle(conn)
    proto = THeaderProtocol(transport, [THeaderClientType.HEADERS])
    try:
        while True:
            name, kind, seq = proto.readMessageBegin()
            proto.skip(TType.STRUCT)
            proto.readMessageEnd()
            headers = proto.get_headers()
            if name.split(":")[-1] == "whoami":
                proto.writeMessageBegin(name, TMessageType.REPLY, seq)
                proto.writeStructBegin("result")
                proto.writeFieldBegin("success", TType.STRING, 0)
                route = headers.get(b"x-version", b"").decode()
                proto.writeString(ident + ("@" + route if route else ""))
                proto.writeFieldEnd()
                proto.writeFieldStop()
                proto.writeStructEnd()
            else:
                proto.writeMessageBegin(name, TMessageType.EXCEPTION, seq)
                TApplicationException(TApplicationException.UNKNOWN_METHOD, "unknown method " + name).write(proto)
            proto.writeMessageEnd()
            proto.trans.flush()
    except Exception:
        conn.close()


def call(addr, n, compact, headers):
    host, port = addr.rsplit(":", 1)
    transport = TSocket(host, int(port))
    transport.open()
    transport.handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sub = THeaderSubprotocolID.COMPACT if compact else THeaderSubprotocolID.BINARY
    proto = THeaderProtocol(transport, [THeaderClientType.HEADERS], default_protocol=sub)
    by_server, errors, seq_ok = {}, [], True
    for seq in range(n):
        for key, value in headers:
            proto.set_header(key.encode(), value.encode())
        proto.writeMessageBegin("whoami", TMessageType.CALL, seq)
        proto.writeStructBegin("args")
        proto.writeFieldStop()
        proto.writeStructEnd()
        proto.writeMessageEnd()
        proto.trans.flush()
        _, kind, rseq = proto.readMessageBegin()
        seq_ok = seq_ok and rseq == seq
        if kind == TMessageType.EXCEPTION:
            e = TApplicationException()
            e.read(proto)
            errors.append(e.message)
        else:
            proto.readStructBegin()
            proto.readFieldBegin()
            who = proto.readString()
            proto.readFieldEnd()
            proto.readFieldBegin()
            proto.readStructEnd()
            by_server[who] = by_server.get(who, 0) + 1
        proto.readMessageEnd()
    print(json.dumps({"by_server": by_server, "app_errors": errors, "seq_ok": seq_ok}))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        args = sys.argv[2:]
        headers = [a.split("=", 1) for i, a in enumerate(args) if i > 0 and args[i - 1] == "--header"]
        call(args[0], int(args[1]), "--compact" in args, headers)
