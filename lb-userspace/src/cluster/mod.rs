//! Cluster mode: the services' desired state lives in etcd under
//! `/lb/<name>/services` (one JSON document, so one compare-and-swap
//! covers every change), shared by every node. This module owns the etcd
//! client, the stored form and what the node knows of its link to etcd.
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::{
    config::{self, ClusterConfig, RawService, Seg, ServiceConfig},
    lock,
};

pub mod etcd;

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
}

pub struct Cluster {
    pub config: ClusterConfig,
    pub client: etcd::Client,
    view: Mutex<ClusterView>,
    /// The newest revision offered to the reconcile loop (applied or not).
    seen: Mutex<i64>,
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

    pub fn view(&self) -> ClusterView {
        lock(&self.view).clone()
    }

    pub fn applied(&self) -> i64 {
        lock(&self.view).revision
    }

    pub fn set_applied(&self, revision: i64) {
        let mut v = lock(&self.view);
        v.revision = revision;
        v.last_error = None;
        drop(v);
        self.offered(revision);
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
