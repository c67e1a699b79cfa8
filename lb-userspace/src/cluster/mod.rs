//! Cluster mode: the services' desired state lives in etcd under
//! `/lb/<name>/services` (one JSON document, so one compare-and-swap
//! covers every change), shared by every node, and each node's health
//! verdicts under `/lb/<name>/health/<node>` (on a lease; its table
//! fingerprints beside them, see `tables`). This module owns
//! the etcd client, the stored forms, the cluster's health rule and what
//! the node knows of its link to etcd.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{self, ClusterConfig, RawService, Seg, ServiceConfig},
    lock,
    state::Verdicts,
};

/// A node's published verdicts: by service, then backend.
type StoredVerdicts = BTreeMap<String, BTreeMap<SocketAddr, bool>>;

pub mod etcd;
pub mod tables;

/// The stored form of the services: the state file's and the API's shape.
#[derive(Serialize, Deserialize)]
struct Stored {
    services: Vec<RawService>,
}

/// The node's view of the cluster, for `GET /api/v1/status` and `lb status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterView {
    pub name: String,
    pub node: String,
    /// A member answered the last request or heartbeat of the watch.
    pub connected: bool,
    /// The member the node watches (when connected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The etcd revision of the services in force on this node (0: none yet).
    pub revision: i64,
    /// Why the node is not connected, or why a revision was not applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The live nodes (their health lease holds), this one included.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// `service/backend` pairs the cluster's rule takes out: a majority of
    /// the live nodes see them down.
    #[serde(default)]
    pub backends_down: Vec<String>,
    /// The node has taken etcd's services since it started; until then it
    /// announces nothing (`cluster_not_synced`).
    #[serde(default)]
    pub synced: bool,
}

pub struct Cluster {
    pub config: ClusterConfig,
    pub client: etcd::Client,
    view: Mutex<ClusterView>,
    /// The newest revision offered to the reconcile loop (applied or not).
    seen: Mutex<i64>,
    /// The other live nodes' verdicts, by node.
    peers: Mutex<BTreeMap<String, Verdicts>>,
    /// The other live nodes' table fingerprints, by node.
    peer_tables: Mutex<BTreeMap<String, tables::Fingerprints>>,
    /// See [`Cluster::is_synced`].
    synced: std::sync::atomic::AtomicBool,
}

impl Cluster {
    pub fn new(config: &ClusterConfig) -> Result<Cluster, etcd::EtcdError> {
        Ok(Cluster {
            client: etcd::Client::new(config)?,
            view: Mutex::new(ClusterView {
                name: config.name.clone(),
                node: config.node.clone(),
                ..ClusterView::default()
            }),
            config: config.clone(),
            seen: Mutex::new(0),
            peers: Mutex::new(BTreeMap::new()),
            peer_tables: Mutex::new(BTreeMap::new()),
            synced: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The key holding the services.
    pub fn services_key(&self) -> String {
        format!("{}services", self.config.prefix())
    }

    pub fn encode(services: &[ServiceConfig]) -> Vec<u8> {
        let stored = Stored {
            services: services.iter().map(RawService::from).collect(),
        };
        serde_json::to_vec(&stored).unwrap_or_default()
    }

    /// The services stored at one revision, each validated as the config
    /// file's are.
    pub fn decode(value: &[u8]) -> Result<Vec<ServiceConfig>, String> {
        let stored: Stored = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for (i, raw) in stored.services.iter().enumerate() {
            let path = [Seg::Key("services".into()), Seg::Index(i)];
            out.push(config::service(&path, raw).map_err(|e| e.in_body().to_string())?);
        }
        Ok(out)
    }

    /// The view, with the live nodes and what the health rule takes out
    /// given this node's own verdicts.
    pub fn view(&self, local: &Verdicts) -> ClusterView {
        let mut v = lock(&self.view).clone();
        v.synced = self.is_synced();
        if v.connected {
            v.nodes = self.live_nodes().into_iter().collect();
        }
        v.nodes.push(self.config.node.clone());
        v.nodes.sort();
        v.nodes.dedup();
        let mut down: Vec<String> = self
            .merged(local)
            .into_iter()
            .filter(|(_, up)| !up)
            .map(|((s, b), _)| format!("{s}/{b}"))
            .collect();
        down.sort();
        v.backends_down = down;
        v
    }

    pub fn last_error(&self) -> Option<String> {
        lock(&self.view).last_error.clone()
    }

    pub fn is_connected(&self) -> bool {
        lock(&self.view).connected
    }

    pub fn health_prefix(&self) -> String {
        format!("{}health/", self.config.prefix())
    }

    /// Where this node publishes its verdicts.
    pub fn health_key(&self) -> String {
        format!("{}{}", self.health_prefix(), self.config.node)
    }

    pub fn encode_verdicts(v: &Verdicts) -> Vec<u8> {
        let mut out = StoredVerdicts::new();
        for ((s, b), up) in v {
            out.entry(s.clone()).or_default().insert(*b, *up);
        }
        serde_json::to_vec(&out).unwrap_or_default()
    }

    pub fn decode_verdicts(value: &[u8]) -> Result<Verdicts, String> {
        let stored: StoredVerdicts = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        Ok(stored
            .into_iter()
            .flat_map(|(s, bs)| bs.into_iter().map(move |(b, up)| ((s.clone(), b), up)))
            .collect())
    }

    /// A peer's verdicts published (`Some`) or gone with its lease
    /// (`None`); true when that changed anything. This node's own key is
    /// not a peer.
    pub fn set_peer(&self, node: &str, verdicts: Option<Verdicts>) -> bool {
        if node == self.config.node {
            return false;
        }
        let mut peers = lock(&self.peers);
        match verdicts {
            Some(v) => peers.insert(node.to_string(), v.clone()) != Some(v),
            None => peers.remove(node).is_some(),
        }
    }

    /// Every peer at once (after a resync).
    pub fn set_peers(&self, all: BTreeMap<String, Verdicts>) {
        let mut all = all;
        all.remove(&self.config.node);
        *lock(&self.peers) = all;
    }

    /// The cluster's rule: a backend is out when a strict majority of the
    /// live nodes (this one and the peers whose lease holds) see it down;
    /// a node with no verdict on it counts as seeing it up. While etcd is
    /// unreachable the node goes by its own checks alone.
    pub fn merged(&self, local: &Verdicts) -> Verdicts {
        if !self.is_connected() {
            return local.clone();
        }
        let peers = lock(&self.peers);
        let live = peers.len() + 1;
        let keys: BTreeSet<&(String, SocketAddr)> = local
            .keys()
            .chain(peers.values().flat_map(|v| v.keys()))
            .collect();
        keys.into_iter()
            .map(|k| {
                let down = std::iter::once(local)
                    .chain(peers.values())
                    .filter(|v| v.get(k) == Some(&false))
                    .count();
                (k.clone(), down * 2 <= live)
            })
            .collect()
    }

    pub fn applied(&self) -> i64 {
        lock(&self.view).revision
    }

    pub fn set_applied(&self, revision: i64) {
        self.mark_synced();
        let mut v = lock(&self.view);
        v.revision = revision;
        v.last_error = None;
        drop(v);
        self.offered(revision);
    }

    /// The services key is gone from etcd: the next write creates it.
    pub fn forget_revision(&self) {
        lock(&self.view).revision = 0;
    }

    pub fn seen(&self) -> i64 {
        *lock(&self.seen)
    }

    pub fn offered(&self, revision: i64) {
        let mut s = lock(&self.seen);
        *s = (*s).max(revision);
    }

    pub fn connected(&self, endpoint: String) {
        let mut v = lock(&self.view);
        v.connected = true;
        v.endpoint = Some(endpoint);
    }

    pub fn disconnected(&self, why: String) {
        let mut v = lock(&self.view);
        v.connected = false;
        v.endpoint = None;
        v.last_error = Some(why);
    }

    pub fn error(&self, why: String) {
        lock(&self.view).last_error = Some(why);
    }
}

/// A cluster handle for unit tests: node `a` of cluster `c`, one plain
/// endpoint, not yet connected.
#[cfg(test)]
pub(crate) fn test_cluster() -> Cluster {
    let cfg = ClusterConfig {
        endpoints: vec![config::EtcdEndpoint {
            tls: false,
            authority: "127.0.0.1:2379".into(),
            host: "127.0.0.1".into(),
            port: 2379,
        }],
        node: "a".into(),
        name: "c".into(),
        ca_file: None,
        cert_file: None,
        key_file: None,
        pin_sync: None,
    };
    Cluster::new(&cfg).expect("a valid test cluster")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Cluster {
        let c = test_cluster();
        c.connected("x".into());
        c
    }

    fn down(b: &str) -> Verdicts {
        [(("web".to_string(), b.parse().unwrap()), false)].into()
    }

    #[test]
    fn a_backend_is_out_when_a_majority_of_live_nodes_see_it_down() {
        let c = cluster();
        let key = ("web".to_string(), "10.0.0.1:80".parse().unwrap());
        // Alone: its own verdict decides.
        assert!(!c.merged(&down("10.0.0.1:80"))[&key]);
        // One of three: stays in; two of three: out.
        c.set_peer("b", Some(Verdicts::new()));
        c.set_peer("c", Some(Verdicts::new()));
        assert!(c.merged(&down("10.0.0.1:80"))[&key]);
        assert!(c.set_peer("b", Some(down("10.0.0.1:80"))));
        assert!(!c.merged(&down("10.0.0.1:80"))[&key]);
        assert!(c.merged(&Verdicts::new())[&key]);
        // One of two (c's lease expired): not a majority.
        assert!(c.set_peer("c", None));
        assert!(c.merged(&Verdicts::new())[&key]);
        assert!(!c.merged(&down("10.0.0.1:80"))[&key]);
        // Cut off from etcd: its own checks alone.
        c.disconnected("gone".into());
        assert_eq!(c.merged(&Verdicts::new()).get(&key), None);
        let v = Cluster::decode_verdicts(&Cluster::encode_verdicts(&down("10.0.0.1:80"))).unwrap();
        assert_eq!(v, down("10.0.0.1:80"));
    }
}
