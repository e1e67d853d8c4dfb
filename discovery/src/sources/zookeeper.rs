//! ZooKeeper as a registry of Finagle/Aurora serversets: a serverset is a path whose members
//! are ephemeral sequential `member_<digits>` znodes holding a Thrift `ServiceInstance` as
//! JSON (`serviceEndpoint {host, port}`, `additionalEndpoints {name: {host, port}}`,
//! `status`, `shard`; finagle-serversets `Group.java`, `Entry.scala`). As Finagle's
//! resolver, only ALIVE members are served; a named endpoint picks from
//! `additionalEndpoints`. Aurora announces host names: they are resolved, and a member whose
//! name does not resolve is skipped and counted. A member leaves when its session ends.
//!
//! The client speaks ZooKeeper's protocol itself, over one tokio connection: a session,
//! `getChildren2` with a watch per serverset (re-armed on every `NodeChildrenChanged`), and
//! `getData` per new member (members are immutable while they live, as Finagle caches them).
//! A serverset path that does not exist yet is read again at every ping. When the session is
//! lost the source is marked failing, keeps its last endpoints, and starts again.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::Duration,
};

use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tracing::info;

use super::{Backoff, SourceEvent};
use crate::{
    catalog::SourceKind,
    config::{Parsed, Skipped},
    model::{Endpoint, Health, Locality, Service},
};

/// One serverset served as a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serverset {
    pub service: String,
    pub path: String,
    /// An `additionalEndpoints` name instead of `serviceEndpoint`.
    pub endpoint: Option<String>,
}

impl std::str::FromStr for Serverset {
    type Err = String;

    /// `NAME=/path` or `NAME=/path!endpoint` (Finagle's `zk2!hosts!/path!endpoint`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (service, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not NAME=/path[!endpoint]"))?;
        let (path, endpoint) = match rest.split_once('!') {
            Some((p, e)) => (p, Some(e.to_owned())),
            None => (rest, None),
        };
        if service.is_empty() || !path.starts_with('/') || path.len() < 2 {
            return Err(format!("{s:?} is not NAME=/path[!endpoint]"));
        }
        Ok(Self {
            service: service.to_owned(),
            path: path.trim_end_matches('/').to_owned(),
            endpoint: endpoint.filter(|e| !e.is_empty()),
        })
    }
}

/// Where the registry is.
#[derive(Clone, Debug)]
pub struct ZookeeperSource {
    /// `host:port` of ZooKeeper servers, tried in turn.
    pub hosts: Vec<String>,
    pub serversets: Vec<Serverset>,
    pub session_timeout: Duration,
}

impl ZookeeperSource {
    pub fn name(&self) -> String {
        format!("zookeeper:{}", self.hosts.join(","))
    }
}

#[derive(Deserialize)]
struct HostPort {
    host: String,
    port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceInstance {
    service_endpoint: Option<HostPort>,
    #[serde(default)]
    additional_endpoints: HashMap<String, HostPort>,
    #[serde(default)]
    status: String,
}

/// The address a member announces for `set`, resolved; or why it is not served.
async fn member_address(set: &Serverset, data: &[u8]) -> Result<SocketAddr, String> {
    let instance: ServiceInstance =
        serde_json::from_slice(data).map_err(|e| format!("not a ServiceInstance: {e}"))?;
    if instance.status != "ALIVE" {
        return Err(format!(
            "status {:?}: only ALIVE members are served",
            instance.status
        ));
    }
    let endpoint = match &set.endpoint {
        Some(name) => instance
            .additional_endpoints
            .get(name)
            .ok_or_else(|| format!("no additional endpoint {name:?}"))?,
        None => instance
            .service_endpoint
            .as_ref()
            .ok_or("no serviceEndpoint")?,
    };
    if let Ok(ip) = endpoint.host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, endpoint.port));
    }
    let resolved = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port)),
    )
    .await
    .map_err(|_| format!("resolving {:?} took over 2 s", endpoint.host))?
    .map_err(|e| format!("{:?} does not resolve: {e}", endpoint.host))?
    .collect::<Vec<_>>();
    resolved
        .iter()
        .find(|a| a.is_ipv4())
        .or(resolved.first())
        .copied()
        .ok_or_else(|| format!("{:?} resolves to nothing", endpoint.host))
}

/// A serverset's members as a service: their data by member name.
async fn service(
    set: &Serverset,
    members: &BTreeMap<String, Vec<u8>>,
    skipped: &mut Vec<Skipped>,
) -> Service {
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for (member, data) in members {
        match member_address(set, data).await {
            Ok(address) if endpoints.iter().any(|e| e.address == address) => {
                skipped.push(Skipped {
                    entry: format!("{}/{member}", set.path),
                    reason: "the same address twice in a serverset".into(),
                })
            }
            Ok(address) => endpoints.push(Endpoint {
                address,
                weight: 1,
                locality: Locality::default(),
                health: Health::Unknown,
            }),
            Err(reason) => skipped.push(Skipped {
                entry: format!("{}/{member}", set.path),
                reason,
            }),
        }
    }
    Service::registered(set.service.clone(), endpoints)
}

/// Whether a child of a serverset is a member (Finagle: `member_` and digits).
fn is_member(name: &str) -> bool {
    name.strip_prefix("member_")
        .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit() || c == '-'))
}

impl super::Registry for ZookeeperSource {
    fn name(&self) -> String {
        ZookeeperSource::name(self)
    }

    async fn session(&self, events: &mpsc::Sender<SourceEvent>, backoff: &mut Backoff) -> String {
        session(self, events, backoff).await
    }
}

/// ZooKeeper's operation codes and the xids of its notifications.
const GET_DATA: i32 = 4;
const PING: i32 = 11;
const GET_CHILDREN2: i32 = 12;
const WATCH_XID: i32 = -1;
const PING_XID: i32 = -2;
const NO_NODE: i32 = -101;
/// The largest frame read from a server.
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// At most this many members per serverset are read.
const MAX_MEMBERS: usize = 10_000;

/// Jute encoding of requests.
#[derive(Default)]
struct Jute(Vec<u8>);

impl Jute {
    fn int(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn long(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(&(b.len() as i32).to_be_bytes());
        self.0.extend_from_slice(b);
        self
    }
    fn bool(mut self, v: bool) -> Self {
        self.0.push(u8::from(v));
        self
    }
    fn framed(self) -> Vec<u8> {
        let mut out = (self.0.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&self.0);
        out
    }
}

/// Jute decoding of a received frame.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("a ZooKeeper frame ended early".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn int(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().map_err(|_| "int")?,
        ))
    }
    fn long(&mut self) -> Result<i64, String> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().map_err(|_| "long")?,
        ))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.int()?;
        if n < 0 {
            return Ok(Vec::new());
        }
        Ok(self.take(n as usize)?.to_vec())
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|_| "a name that is not UTF-8".into())
    }
}

/// One ZooKeeper session over one connection.
struct Session {
    stream: TcpStream,
    xid: i32,
    /// Serversets whose children changed, from notifications read while waiting for replies.
    changed: Vec<String>,
}

impl Session {
    async fn open(hosts: &[String], timeout: Duration) -> Result<Self, String> {
        let mut last = "no ZooKeeper host given".to_owned();
        for host in hosts {
            let attempt = async {
                let mut stream = TcpStream::connect(host.as_str())
                    .await
                    .map_err(|e| format!("{host}: {e}"))?;
                let connect = Jute::default()
                    .int(0)
                    .long(0)
                    .int(timeout.as_millis() as i32)
                    .long(0)
                    .bytes(&[0; 16])
                    .bool(false)
                    .framed();
                stream
                    .write_all(&connect)
                    .await
                    .map_err(|e| format!("{host}: {e}"))?;
                let frame = read_frame(&mut stream).await?;
                let mut r = Reader(&frame);
                r.int()?;
                let negotiated = r.int()?;
                if negotiated <= 0 {
                    return Err(format!("{host} refused the session"));
                }
                Ok(Self {
                    stream,
                    xid: 0,
                    changed: Vec::new(),
                })
            };
            match tokio::time::timeout(Duration::from_secs(3), attempt).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("{host}: no session within 3 s"),
            }
        }
        Err(last)
    }

    /// Sends a request and returns its reply's body (or the error code).
    async fn call(&mut self, op: i32, body: Jute) -> Result<Result<Vec<u8>, i32>, String> {
        self.xid += 1;
        let xid = self.xid;
        let request = Jute::default().int(xid).int(op);
        let mut frame = request.0;
        frame.extend_from_slice(&body.0);
        self.send(Jute(frame)).await?;
        loop {
            let frame = read_frame(&mut self.stream).await?;
            let mut r = Reader(&frame);
            let got = r.int()?;
            r.long()?;
            let err = r.int()?;
            if got == WATCH_XID {
                self.notification(r)?;
                continue;
            }
            if got != xid {
                continue; // a ping's reply
            }
            return Ok(if err == 0 { Ok(r.0.to_vec()) } else { Err(err) });
        }
    }

    fn notification(&mut self, mut r: Reader<'_>) -> Result<(), String> {
        let _kind = r.int()?;
        let _state = r.int()?;
        let path = r.string()?;
        self.changed.push(path);
        Ok(())
    }

    async fn send(&mut self, body: Jute) -> Result<(), String> {
        self.stream
            .write_all(&body.framed())
            .await
            .map_err(|e| format!("ZooKeeper connection: {e}"))
    }

    /// The members of `path`, with a watch on its children (None: it does not exist).
    async fn children(&mut self, path: &str) -> Result<Option<Vec<String>>, String> {
        match self
            .call(
                GET_CHILDREN2,
                Jute::default().bytes(path.as_bytes()).bool(true),
            )
            .await?
        {
            Ok(body) => {
                let mut r = Reader(&body);
                let n = r.int()?.max(0) as usize;
                let mut children = Vec::with_capacity(n.min(MAX_MEMBERS));
                for _ in 0..n {
                    let child = r.string()?;
                    if is_member(&child) && children.len() < MAX_MEMBERS {
                        children.push(child);
                    }
                }
                Ok(Some(children))
            }
            Err(NO_NODE) => Ok(None),
            Err(code) => Err(format!("getChildren {path}: error {code}")),
        }
    }

    /// A member's data (None: it left in between).
    async fn data(&mut self, path: &str) -> Result<Option<Vec<u8>>, String> {
        match self
            .call(GET_DATA, Jute::default().bytes(path.as_bytes()).bool(false))
            .await?
        {
            Ok(body) => Ok(Some(Reader(&body).bytes()?)),
            Err(NO_NODE) => Ok(None),
            Err(code) => Err(format!("getData {path}: error {code}")),
        }
    }
}

async fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let len = stream
        .read_u32()
        .await
        .map_err(|e| format!("ZooKeeper connection: {e}"))? as usize;
    if len > MAX_FRAME {
        return Err(format!("a ZooKeeper frame of {len} bytes"));
    }
    let mut frame = vec![0; len];
    stream
        .read_exact(&mut frame)
        .await
        .map_err(|e| format!("ZooKeeper connection: {e}"))?;
    Ok(frame)
}

/// One session: every serverset read, then kept up to date; returns why it ended.
async fn session(
    source: &ZookeeperSource,
    events: &mpsc::Sender<SourceEvent>,
    backoff: &mut Backoff,
) -> String {
    let mut zk = match Session::open(&source.hosts, source.session_timeout).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    // Per serverset: its members' data, by member name.
    let mut members: Vec<BTreeMap<String, Vec<u8>>> =
        vec![BTreeMap::new(); source.serversets.len()];
    let mut stale: Vec<bool> = vec![true; source.serversets.len()];
    let ping_every = source.session_timeout / 3;
    let mut first = true;
    loop {
        for (i, set) in source.serversets.iter().enumerate() {
            if !stale[i] {
                continue;
            }
            let children = match zk.children(&set.path).await {
                Ok(c) => c,
                Err(e) => return e,
            };
            // A path that does not exist yet: read again at the next ping.
            stale[i] = children.is_none();
            let children = children.unwrap_or_default();
            members[i].retain(|m, _| children.contains(m));
            for child in children {
                if members[i].contains_key(&child) {
                    continue;
                }
                match zk.data(&format!("{}/{child}", set.path)).await {
                    Ok(Some(data)) => {
                        members[i].insert(child, data);
                    }
                    Ok(None) => {}
                    Err(e) => return e,
                }
            }
        }
        let mut skipped = Vec::new();
        let mut services = Vec::with_capacity(source.serversets.len());
        for (i, set) in source.serversets.iter().enumerate() {
            services.push(service(set, &members[i], &mut skipped).await);
        }
        let event = SourceEvent {
            source: source.name(),
            kind: SourceKind::Registry,
            result: Ok(Parsed { services, skipped }),
        };
        if events.send(event).await.is_err() {
            return "stopped".into();
        }
        if first {
            first = false;
            backoff.reset();
            info!(hosts = %source.hosts.join(","), serversets = source.serversets.len(), "ZooKeeper serversets read; watching them");
        }
        // Wait for a notification, pinging the session meanwhile.
        while zk.changed.is_empty() && !stale.iter().any(|s| *s) {
            match tokio::time::timeout(ping_every, read_frame(&mut zk.stream)).await {
                Ok(Ok(frame)) => {
                    let mut r = Reader(&frame);
                    let xid = match r.int() {
                        Ok(x) => x,
                        Err(e) => return e,
                    };
                    if xid == WATCH_XID
                        && let Err(e) = r
                            .long()
                            .and_then(|_| r.int())
                            .and_then(|_| zk.notification(r))
                    {
                        return e;
                    }
                }
                Ok(Err(e)) => return e,
                Err(_) => {
                    if let Err(e) = zk.send(Jute::default().int(PING_XID).int(PING)).await {
                        return e;
                    }
                }
            }
        }
        if stale.iter().any(|s| *s) && zk.changed.is_empty() {
            tokio::time::sleep(ping_every).await;
        }
        for path in std::mem::take(&mut zk.changed) {
            for (i, set) in source.serversets.iter().enumerate() {
                if set.path == path {
                    stale[i] = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serversets_parse_as_finagle_names_them() {
        let s: Serverset = "calc=/aurora/www/prod/calc!thrift".parse().unwrap();
        assert_eq!(s.path, "/aurora/www/prod/calc");
        assert_eq!(s.endpoint.as_deref(), Some("thrift"));
        assert!("calc".parse::<Serverset>().is_err());
        assert!("calc=relative".parse::<Serverset>().is_err());
        assert!(is_member("member_0000000001"));
        assert!(!is_member("lock_0000000001") && !is_member("member_"));
    }

    #[tokio::test]
    async fn alive_members_are_served_and_others_skipped_with_reasons() {
        let set: Serverset = "calc=/s".parse().unwrap();
        let named: Serverset = "calc=/s!admin".parse().unwrap();
        let data = |json: &str| json.as_bytes().to_vec();
        let members: BTreeMap<String, Vec<u8>> = [
            ("member_0000000001".to_owned(), data(r#"{"serviceEndpoint":{"host":"10.0.0.1","port":9090},"additionalEndpoints":{"admin":{"host":"10.0.0.1","port":9990}},"status":"ALIVE","shard":0}"#)),
            ("member_0000000002".to_owned(), data(r#"{"serviceEndpoint":{"host":"localhost","port":9090},"additionalEndpoints":{},"status":"ALIVE"}"#)),
            ("member_0000000003".to_owned(), data(r#"{"serviceEndpoint":{"host":"10.0.0.3","port":9090},"status":"STOPPING"}"#)),
            ("member_0000000004".to_owned(), data("{")),
            ("member_0000000005".to_owned(), data(r#"{"serviceEndpoint":{"host":"no-such-host.invalid","port":9090},"status":"ALIVE"}"#)),
        ]
        .into();
        let mut skipped = Vec::new();
        let s = service(&set, &members, &mut skipped).await;
        let addresses: Vec<String> = s.endpoints.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(
            addresses,
            ["10.0.0.1:9090", "127.0.0.1:9090"],
            "a host name is resolved"
        );
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped[0].reason.contains("only ALIVE"));
        assert!(skipped[1].reason.contains("not a ServiceInstance"));
        assert!(skipped[2].reason.contains("does not resolve"));
        let mut skipped = Vec::new();
        let admin = service(&named, &members, &mut skipped).await;
        assert_eq!(admin.endpoints[0].address.to_string(), "10.0.0.1:9990");
    }
}
