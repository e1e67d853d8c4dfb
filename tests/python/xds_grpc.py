"""A gRPC server and a proxyless gRPC client (grpcio's own xDS client) for tern discovery's tests.

  xds_grpc.py serve ADDR ID            answers /tern.Echo/Who with ID; prints "ready"
  xds_grpc.py call TARGET N [--phases K]
                                       makes N calls to TARGET (e.g. xds:///echo) on one channel
                                       and prints one JSON line per phase:
                                       {"by_server": {ID: n}, "errors": n, "last_error": ...};
                                       between phases it waits for a line on stdin.

The client reads GRPC_XDS_BOOTSTRAP, as every gRPC xDS client does. Requests and replies are
raw bytes: no generated code.
"""
import json
import sys
import time
from concurrent import futures

import grpc

METHOD = "/tern.Echo/Who"


def serve(addr, ident):
    def who(request, context):
        return ident.encode()

    handler = grpc.method_handlers_generic_handler(
        "tern.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(addr)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def call(target, n, phases):
    channel = grpc.insecure_channel(target)
    who = channel.unary_unary(METHOD)
    for _ in range(phases):
        by_server, errors, last_error = {}, 0, None
        for _ in range(n):
            try:
                ident = who(b"", timeout=20, wait_for_ready=True).decode()
                by_server[ident] = by_server.get(ident, 0) + 1
            except grpc.RpcError as e:
                errors += 1
                last_error = f"{e.code().name}: {e.details()}"
        print(json.dumps({"by_server": by_server, "errors": errors, "last_error": last_error}), flush=True)
        if phases > 1 and not sys.stdin.readline():
            return


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        phases = int(sys.argv[sys.argv.index("--phases") + 1]) if "--phases" in sys.argv else 1
        call(sys.argv[2], int(sys.argv[3]), phases)
