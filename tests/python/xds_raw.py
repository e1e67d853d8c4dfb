"""An xDS client written against Envoy's own protos (xds-protos) and grpcio, not tern's code,
for tern discovery's protocol tests. Each command prints one JSON line per phase and waits
for a line on stdin before the next.

    xds_raw.py nack ADDR
        state of the world, clusters by wildcard: ACKs the first response (phase 1), then
        NACKs the next one pushed (phase 2: {"version", "nacked"}), then reports whether the
        server sent anything more within 1 s (phase 3: {"resent": bool}).
    xds_raw.py delta ADDR
        delta, clusters by wildcard: reads and ACKs the first response (phase 1:
        {"resources": {name: version}}), closes the stream; after a line on stdin, opens a new
        stream with those initial_resource_versions and reports what it was sent (phase 2:
        {"resources": [...], "removed": [...]}).
    xds_raw.py per-type ADDR CLUSTER
        CDS on its own service (StreamClusters, wildcard), EDS's FetchEndpoints for CLUSTER, and a
        listener asked of CDS; prints {"clusters": n, "endpoints": n, "wrong_type": error}.
    xds_raw.py stall ADDR N
        a delta client subscribing to every cluster and the endpoints of svc-0 … svc-N-1 that
        never reads a response (a client that cannot keep up); prints "ready" once subscribed.
    xds_raw.py flood ADDR N
        opens N delta streams one after another, each subscribing to every cluster, and keeps
        those answered; then, with one of them closed, a stream naming 17 resource types and
        one subscribing to 100,001 endpoints names; prints {"kept": n, "refused": [error, ...],
        "types": error, "names": error}.
    xds_raw.py csds ADDR
        FetchClientStatus (CSDS) for every client; prints
        {node_id: {type_url: {"config_status", "client_status", "version", "error"}}}.
    xds_raw.py probe ADDR CA [CERT KEY]
        opens a state-of-the-world stream over TLS (the server checked against CA, with the
        client certificate if given) and prints {"ok": true} once a response arrives, or
        {"ok": false, "error": ...}.
"""
import json
import queue
import sys
import threading

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
NODE = base_pb2.Node(id="raw-client", cluster="tern-tests", user_agent_name="xds-raw")


def wait():
    if not sys.stdin.readline():
        sys.exit(0)


def say(**kw):
    print(json.dumps(kw), flush=True)


class Stream:
    """A bidirectional stream fed from a queue; responses read with a timeout."""

    def __init__(self, method):
        self.requests = queue.Queue()
        self.responses = queue.Queue()
        self.call = method(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    error = None

    def _read(self):
        try:
            for r in self.call:
                self.responses.put(r)
        except grpc.RpcError as e:
            self.error = f"{e.code().name}: {e.details()}"
            self.responses.put(None)

    def send(self, request):
        self.requests.put(request)

    def recv(self, timeout=10):
        return self.responses.get(timeout=timeout)

    def close(self):
        self.requests.put(None)
        self.call.cancel()


def nack(addr):
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(grpc.insecure_channel(addr))
    s = Stream(stub.StreamAggregatedResources)
    s.send(discovery_pb2.DiscoveryRequest(node=NODE, type_url=CDS))
    first = s.recv()
    s.send(discovery_pb2.DiscoveryRequest(type_url=CDS, version_info=first.version_info, response_nonce=first.nonce))
    say(version=first.version_info, clusters=len(first.resources))
    wait()
    pushed = s.recv()
    s.send(
        discovery_pb2.DiscoveryRequest(
            type_url=CDS,
            version_info=first.version_info,
            response_nonce=pushed.nonce,
            error_detail=status_pb2.Status(code=3, message="refused by the test client"),
        )
    )
    say(version=pushed.version_info, nacked=True)
    wait()
    try:
        s.recv(timeout=1)
        say(resent=True)
    except queue.Empty:
        say(resent=False)
    s.close()


def delta(addr):
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(grpc.insecure_channel(addr))
    s = Stream(stub.DeltaAggregatedResources)
    s.send(discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=CDS, resource_names_subscribe=["*"]))
    first = s.recv()
    held = {r.name: r.version for r in first.resources}
    s.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=first.nonce))
    s.close()
    say(resources=held)
    wait()
    s = Stream(stub.DeltaAggregatedResources)
    s.send(
        discovery_pb2.DeltaDiscoveryRequest(
            node=NODE, type_url=CDS, resource_names_subscribe=["*"], initial_resource_versions=held
        )
    )
    try:
        r = s.recv(timeout=3)
        say(resources=[x.name for x in r.resources], removed=list(r.removed_resources))
    except queue.Empty:
        say(resources=[], removed=[])
    s.close()


def per_type(addr, cluster):
    from envoy.service.cluster.v3 import cds_pb2_grpc
    from envoy.service.endpoint.v3 import eds_pb2_grpc

    channel = grpc.insecure_channel(addr)
    cds = cds_pb2_grpc.ClusterDiscoveryServiceStub(channel)
    s = Stream(cds.StreamClusters)
    s.send(discovery_pb2.DiscoveryRequest(node=NODE, type_url=CDS))
    clusters = len(s.recv().resources)
    s.close()
    eds = eds_pb2_grpc.EndpointDiscoveryServiceStub(channel)
    fetched = eds.FetchEndpoints(
        discovery_pb2.DiscoveryRequest(node=NODE, resource_names=[cluster]), timeout=5
    )
    wrong = None
    try:
        call = cds.StreamClusters(
            iter([discovery_pb2.DiscoveryRequest(node=NODE, type_url=LDS)]), timeout=5
        )
        next(iter(call))
    except grpc.RpcError as e:
        wrong = f"{e.code().name}: {e.details()}"
    say(clusters=clusters, endpoints=len(fetched.resources), wrong_type=wrong)


def stall(addr, n):
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(grpc.insecure_channel(addr))
    requests = queue.Queue()
    call = stub.DeltaAggregatedResources(iter(requests.get, None))
    requests.put(discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=CDS, resource_names_subscribe=["*"]))
    names = [f"outbound|9090||svc-{i}" for i in range(int(n))]
    requests.put(discovery_pb2.DeltaDiscoveryRequest(type_url=EDS, resource_names_subscribe=names))
    print("ready", flush=True)
    # Never reads `call`.
    threading.Event().wait()


def flood(addr, n):
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(grpc.insecure_channel(addr))
    kept, refused = [], []
    for i in range(int(n)):
        s = Stream(stub.DeltaAggregatedResources)
        node = base_pb2.Node(id=f"flood-{i}", user_agent_name="xds-raw")
        s.send(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=CDS, resource_names_subscribe=["*"]))
        if s.recv() is None:
            refused.append(s.error)
        else:
            kept.append(s)
    answered = len(kept)
    kept.pop().close()

    def refusal(requests):
        for _ in range(20):
            s = Stream(stub.DeltaAggregatedResources)
            for r in requests:
                s.send(r)
            try:
                while s.recv(timeout=5) is not None:
                    pass
            except queue.Empty:
                return "not refused"
            s.close()
            # The closed stream's slot may not be free yet: try again.
            if "too many xDS clients" not in s.error:
                return s.error
            threading.Event().wait(0.1)
        return s.error

    types = refusal(
        [discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=f"type.example/t{i}") for i in range(17)]
    )
    names = [f"outbound|9090||svc-{i}" for i in range(100_001)]
    too_many = refusal([discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=EDS, resource_names_subscribe=names)])
    say(kept=answered, refused=refused, types=types, names=too_many)


def csds(addr):
    from envoy.admin.v3 import config_dump_shared_pb2
    from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

    stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(grpc.insecure_channel(addr))
    response = stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), timeout=5)
    out = {}
    for config in response.config:
        out[config.node.id] = {
            g.type_url: {
                "config_status": csds_pb2.ConfigStatus.Name(g.config_status),
                "client_status": config_dump_shared_pb2.ClientResourceStatus.Name(g.client_status),
                "version": g.version_info,
                "error": g.error_state.details,
            }
            for g in config.generic_xds_configs
        }
    say(**out)


def probe(addr, ca, cert=None, key=None):
    read = lambda p: open(p, "rb").read() if p else None
    creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(grpc.secure_channel(addr, creds))
    try:
        call = stub.StreamAggregatedResources(
            iter([discovery_pb2.DiscoveryRequest(node=NODE, type_url=CDS)]), timeout=5
        )
        next(iter(call))
        say(ok=True)
    except grpc.RpcError as e:
        say(ok=False, error=f"{e.code().name}: {e.details()}")


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        probe(*sys.argv[2:])
    elif sys.argv[1] == "csds":
        csds(sys.argv[2])
    elif sys.argv[1] == "flood":
        flood(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "stall":
        stall(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "per-type":
        per_type(sys.argv[2], sys.argv[3])
    else:
        {"nack": nack, "delta": delta}[sys.argv[1]](sys.argv[2])
