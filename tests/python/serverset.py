"""A Finagle/Aurora serverset member, joined with kazoo (ZooKeeper's Python client), for tern
discovery's tests.

    serverset.py join HOSTS PATH HOST PORT [STATUS] [SESSION_S]
        creates PATH if needed, joins it as an ephemeral sequential member_ znode holding a
        ServiceInstance (serviceEndpoint HOST:PORT, an "admin" additional endpoint on PORT+1000,
        STATUS, default ALIVE) as Finagle's JSON codec writes it; prints "ready" and keeps the
        session until killed (a killed process's member leaves when its session expires).
    serverset.py put HOSTS PATH DATA
        creates a persistent znode PATH (parents too) holding DATA, and exits.
"""
import json
import sys
import time

from kazoo.client import KazooClient


def client(hosts, session_s=4.0):
    zk = KazooClient(hosts=hosts, timeout=session_s)
    zk.start(timeout=10)
    return zk


def join(hosts, path, host, port, status="ALIVE", session_s=4.0):
    zk = client(hosts, session_s)
    zk.ensure_path(path)
    instance = {
        "serviceEndpoint": {"host": host, "port": port},
        "additionalEndpoints": {"admin": {"host": host, "port": port + 1000}},
        "status": status,
        "shard": 0,
    }
    zk.create(path + "/member_", json.dumps(instance).encode(), ephemeral=True, sequence=True)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def put(hosts, path, data):
    zk = client(hosts)
    zk.create(path, data.encode(), makepath=True)
    zk.stop()


if __name__ == "__main__":
    if sys.argv[1] == "join":
        status = sys.argv[6] if len(sys.argv) > 6 else "ALIVE"
        session = float(sys.argv[7]) if len(sys.argv) > 7 else 4.0
        join(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), status, session)
    else:
        put(sys.argv[2], sys.argv[3], sys.argv[4])
