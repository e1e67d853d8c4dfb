#!/usr/bin/env python3
"""Turns an Envoy `/config_dump` of an Istio sidecar back into the resources istiod sent it.

    istio_dump.py DUMP.json OUT.bin

Writes the dynamic listeners, clusters and endpoints (ClusterLoadAssignments) as protobuf,
one record each: type URL, name and body, every field length-prefixed (u16, u16, u32, big
endian). `tern-istiod` (istiod's stand-in) serves such a file over ADS (its `dumps:` setting), as istiod would.

JSON is parsed with the reference implementation (`google.protobuf.json_format`) against the
Envoy, UDPA and xDS protos of grpc's `xds-protos` package. Four Istio types inside the dumps
are not in it; their descriptors are declared below with the field numbers of istio/proxy and
istio/api, so they are encoded as istiod encodes them, not dropped.
"""
import importlib
import json
import os
import pkgutil
import struct
import sys

from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf import any_pb2, duration_pb2  # noqa: F401  (registers the well-known types)

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

F = descriptor_pb2.FieldDescriptorProto


def field(name, number, kind, label=F.LABEL_OPTIONAL, type_name=None, oneof=None):
    f = F(name=name, number=number, type=kind, label=label)
    if type_name:
        f.type_name = type_name
    if oneof is not None:
        f.oneof_index = oneof
    return f


def istio_types():
    """The Istio messages the dumps carry that xds-protos lacks."""
    files = []
    stats = descriptor_pb2.FileDescriptorProto(
        name="tern/istio/stats.proto", package="stats", syntax="proto3",
        dependency=["google/protobuf/duration.proto"])
    stats.message_type.add(name="PluginConfig", field=[
        field("disable_host_header_fallback", 6, F.TYPE_BOOL),
        field("tcp_reporting_duration", 7, F.TYPE_MESSAGE, type_name=".google.protobuf.Duration"),
    ])
    files.append(stats)
    mx = descriptor_pb2.FileDescriptorProto(
        name="tern/istio/metadata_exchange.proto",
        package="envoy.tcp.metadataexchange.config", syntax="proto3")
    mx.message_type.add(name="MetadataExchange", field=[
        field("protocol", 1, F.TYPE_STRING),
        field("enable_discovery", 2, F.TYPE_BOOL),
        field("additional_labels", 3, F.TYPE_STRING, F.LABEL_REPEATED),
    ])
    files.append(mx)
    alpn = descriptor_pb2.FileDescriptorProto(
        name="tern/istio/alpn.proto", package="istio.envoy.config.filter.http.alpn.v2alpha1",
        syntax="proto3")
    config = alpn.message_type.add(name="FilterConfig")
    config.enum_type.add(name="Protocol", value=[
        descriptor_pb2.EnumValueDescriptorProto(name=n, number=i)
        for i, n in enumerate(["HTTP10", "HTTP11", "HTTP2"])])
    config.nested_type.add(name="AlpnOverride", field=[
        field("upstream_protocol", 1, F.TYPE_ENUM,
              type_name=".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.Protocol"),
        field("alpn_override", 2, F.TYPE_STRING, F.LABEL_REPEATED),
    ])
    config.field.append(field(
        "alpn_override", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED,
        ".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.AlpnOverride"))
    files.append(alpn)
    policy = descriptor_pb2.FileDescriptorProto(
        name="tern/istio/authentication.proto", package="istio.authentication.v1alpha1",
        syntax="proto3")
    mtls = policy.message_type.add(name="MutualTls")
    mtls.enum_type.add(name="Mode", value=[
        descriptor_pb2.EnumValueDescriptorProto(name="STRICT", number=0),
        descriptor_pb2.EnumValueDescriptorProto(name="PERMISSIVE", number=1)])
    mtls.field.extend([
        field("allow_tls", 1, F.TYPE_BOOL),
        field("mode", 2, F.TYPE_ENUM, type_name=".istio.authentication.v1alpha1.MutualTls.Mode"),
    ])
    peer = policy.message_type.add(name="PeerAuthenticationMethod")
    peer.oneof_decl.add(name="params")
    peer.field.append(field("mtls", 1, F.TYPE_MESSAGE,
                            type_name=".istio.authentication.v1alpha1.MutualTls", oneof=0))
    policy.message_type.add(name="Policy", field=[
        field("peers", 2, F.TYPE_MESSAGE, F.LABEL_REPEATED,
              ".istio.authentication.v1alpha1.PeerAuthenticationMethod"),
        field("peer_is_optional", 3, F.TYPE_BOOL),
        field("origin_is_optional", 5, F.TYPE_BOOL),
    ])
    files.append(policy)
    authn = descriptor_pb2.FileDescriptorProto(
        name="tern/istio/authn.proto", package="istio.envoy.config.filter.http.authn.v2alpha1",
        syntax="proto3", dependency=["tern/istio/authentication.proto"])
    authn.message_type.add(name="FilterConfig", field=[
        field("policy", 1, F.TYPE_MESSAGE, type_name=".istio.authentication.v1alpha1.Policy"),
        field("skip_validate_trust_domain", 3, F.TYPE_BOOL),
        field("allowed_trust_domains", 4, F.TYPE_STRING, F.LABEL_REPEATED),
    ])
    files.append(authn)
    return files


def load_protos():
    """Imports every generated module of xds-protos, so `Any` bodies resolve."""
    for package in ("envoy", "udpa", "xds", "validate"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            if info.name.endswith("_pb2"):
                try:
                    importlib.import_module(info.name)
                except Exception:  # a module for a platform feature we never meet
                    pass
    pool = descriptor_pool.Default()
    for f in istio_types():
        pool.Add(f)
    return pool


def resources(dump):
    for config in dump["configs"]:
        kind = config["@type"].rsplit(".", 1)[-1]
        if kind == "ListenersConfigDump":
            for l in config.get("dynamic_listeners", []):
                state = l.get("active_state") or l.get("warming_state")
                if state:
                    yield LISTENER, state["listener"]
        elif kind == "ClustersConfigDump":
            for c in config.get("dynamic_active_clusters", []):
                yield CLUSTER, c["cluster"]
        elif kind == "EndpointsConfigDump":
            for e in config.get("dynamic_endpoint_configs", []):
                yield ENDPOINTS, e["endpoint_config"]


def main():
    dump_path, out_path = sys.argv[1], sys.argv[2]
    pool = load_protos()
    with open(dump_path) as f:
        dump = json.load(f)
    out = bytearray()
    counts = {}
    for type_url, body in resources(dump):
        message = json_format.ParseDict(body, any_pb2.Any(), descriptor_pool=pool)
        if message.type_url != type_url:
            raise SystemExit(f"{dump_path}: a {message.type_url} where a {type_url} belongs")
        name = body.get("name") or body.get("cluster_name")
        for part, width in ((type_url.encode(), ">H"), (name.encode(), ">H"), (message.value, ">I")):
            out += struct.pack(width, len(part)) + part
        counts[type_url.rsplit(".", 1)[-1]] = counts.get(type_url.rsplit(".", 1)[-1], 0) + 1
    with open(out_path + ".tmp", "wb") as f:
        f.write(out)
    os.replace(out_path + ".tmp", out_path)
    print(json.dumps(counts, sort_keys=True))


if __name__ == "__main__":
    main()
