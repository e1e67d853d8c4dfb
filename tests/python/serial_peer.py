"""A Thrift server as most production ones are: Apache Thrift's Python `TThreadedServer`, which
reads a connection's next request only after it answered the one before.

    serial_peer.py serve ADDR ID [--compact]    prints "ready"; framed transport
        whoami()           -> string ID
        sleep(1: i32 ms)   -> string "late:ID", after sleeping ms
        echo(1: binary)    -> binary, the same bytes
The interface matches `tern-thriftpeer call`'s, so that client can call it.
"""
import sys
import time

from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.protocol.TBinaryProtocol import TBinaryProtocolFactory
from thrift.protocol.TCompactProtocol import TCompactProtocolFactory
from thrift.server.TServer import TThreadedServer
from thrift.transport.TSocket import TServerSocket
from thrift.transport.TTransport import TFramedTransportFactory


class Processor:
    def __init__(self, ident):
        self.ident = ident

    def process(self, iprot, oprot):
        name, kind, seq = iprot.readMessageBegin()
        ms = 0
        data = b""
        iprot.readStructBegin()
        while True:
            _, ftype, fid = iprot.readFieldBegin()
            if ftype == TType.STOP:
                break
            if fid == 1 and ftype == TType.I32:
                ms = iprot.readI32()
            elif fid == 1 and ftype == TType.STRING:
                data = iprot.readBinary()
            else:
                iprot.skip(ftype)
            iprot.readFieldEnd()
        iprot.readStructEnd()
        iprot.readMessageEnd()
        method = name.split(":")[-1]
        if method == "whoami":
            answer = self.ident
        elif method == "sleep":
            time.sleep(ms / 1000)
            answer = "late:" + self.ident
        elif method == "echo":
            answer = data
        else:
            oprot.writeMessageBegin(name, TMessageType.EXCEPTION, seq)
            TApplicationException(TApplicationException.UNKNOWN_METHOD, "unknown method " + name).write(oprot)
            oprot.writeMessageEnd()
            oprot.trans.flush()
            return True
        oprot.writeMessageBegin(name, TMessageType.REPLY, seq)
        oprot.writeStructBegin("result")
        oprot.writeFieldBegin("success", TType.STRING, 0)
        if isinstance(answer, bytes):
            oprot.writeBinary(answer)
        else:
            oprot.writeString(answer)
        oprot.writeFieldEnd()
        oprot.writeFieldStop()
        oprot.writeStructEnd()
        oprot.writeMessageEnd()
        oprot.trans.flush()
        return True


def serve(addr, ident, compact):
    host, port = addr.rsplit(":", 1)
    sock = TServerSocket(host=host, port=int(port))
    proto = TCompactProtocolFactory() if compact else TBinaryProtocolFactory()
    server = TThreadedServer(Processor(ident), sock, TFramedTransportFactory(), proto, daemon=True)
    sock.listen()
    sock.listen = lambda: None  # serve() would bind again
    print("ready", flush=True)
    server.serve()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], "--compact" in sys.argv[4:])
