"""Writes the codec fuzz targets' seed corpus with Apache Thrift's Python library (an encoder
independent of tern): calls, one-way calls and replies in every transport and protocol tern
reads, with nested containers, and THeader with info headers.

    python3 fuzz/make_codec_seeds.py     (from the repository root)
"""
import os

from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.Thrift import TMessageType, TType
from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID
from thrift.transport.TTransport import TMemoryBuffer


def body(p):
    p.writeStructBegin("args")
    p.writeFieldBegin("a", TType.I32, 1)
    p.writeI32(7)
    p.writeFieldEnd()
    p.writeFieldBegin("s", TType.STRING, 2)
    p.writeString("hello")
    p.writeFieldEnd()
    p.writeFieldBegin("l", TType.LIST, 3)
    p.writeListBegin(TType.I64, 3)
    for v in (1, -2, 3 << 40):
        p.writeI64(v)
    p.writeListEnd()
    p.writeFieldEnd()
    p.writeFieldBegin("m", TType.MAP, 20)
    p.writeMapBegin(TType.STRING, TType.STRUCT, 1)
    p.writeString("k")
    p.writeStructBegin("inner")
    p.writeFieldBegin("b", TType.BOOL, 1)
    p.writeBool(True)
    p.writeFieldEnd()
    p.writeFieldBegin("d", TType.DOUBLE, 2)
    p.writeDouble(1.5)
    p.writeFieldEnd()
    p.writeFieldStop()
    p.writeStructEnd()
    p.writeMapEnd()
    p.writeFieldEnd()
    p.writeFieldStop()
    p.writeStructEnd()


def message(proto, name, kind, seq):
    buf = TMemoryBuffer()
    p = proto(buf)
    p.writeMessageBegin(name, kind, seq)
    body(p)
    p.writeMessageEnd()
    return buf.getvalue()


def framed(b):
    return len(b).to_bytes(4, "big") + b


def theader(compact):
    buf = TMemoryBuffer()
    sub = THeaderSubprotocolID.COMPACT if compact else THeaderSubprotocolID.BINARY
    p = THeaderProtocol(buf, [THeaderClientType.HEADERS], default_protocol=sub)
    p.trans.set_header(b"x-cluster", b"calc-v2")
    p.writeMessageBegin("Calc:add", TMessageType.CALL, 300)
    body(p)
    p.writeMessageEnd()
    p.trans.flush()
    return buf.getvalue()


seeds = {}
for pname, proto in (("binary", TBinaryProtocol), ("compact", TCompactProtocol)):
    for kname, kind in (("call", TMessageType.CALL), ("oneway", TMessageType.ONEWAY), ("reply", TMessageType.REPLY)):
        m = message(proto, "Calc:add" if kind == TMessageType.CALL else "add", kind, 200)
        seeds[f"unframed-{pname}-{kname}"] = m
        seeds[f"framed-{pname}-{kname}"] = framed(m)
    seeds[f"framed-{pname}-pipelined"] = framed(message(proto, "a", 1, 1)) * 2 + framed(message(proto, "b", 1, 2))[:9]
seeds["theader-binary"] = theader(False)
seeds["theader-compact"] = theader(True)

configured = {"framed": 0, "unframed": 1, "theader": 2}
for name, data in seeds.items():
    # codec: the first byte is the size of the pieces the bytes arrive in
    with open(os.path.join("fuzz/corpus/codec", name), "wb") as f:
        f.write(bytes([7]) + data)
    transport = name.split("-")[0]
    selector = configured[transport] | (4 if "compact" in name and transport != "theader" else 0)
    with open(os.path.join("fuzz/corpus/codec_configured", name), "wb") as f:
        f.write(bytes([selector]) + data)
