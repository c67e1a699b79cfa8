//! The cluster's table rule: each node publishes its per-service Maglev table
//! fingerprints under `/lb/<name>/tables/<node>` (on its health lease), and a
//! service's cluster fingerprint is the one a strict majority of the live
//! nodes hold. Announcing is gated on it (`announce::TableGate`).
use std::collections::{BTreeMap, BTreeSet};

use super::Cluster;
use crate::lock;

/// A node's published fingerprints: service -> fingerprint (hex).
pub type Fingerprints = BTreeMap<String, String>;

pub fn encode(f: &Fingerprints) -> Vec<u8> {
    serde_json::to_vec(f).unwrap_or_default()
}

pub fn decode(value: &[u8]) -> Result<Fingerprints, serde_json::Error> {
    serde_json::from_slice(value)
}

/// The value a strict majority of `live` nodes hold, if one does (`held`:
/// one value per node that published one; nodes without count against).
pub fn majority<'a>(live: usize, held: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in held {
        *counts.entry(v).or_default() += 1;
    }
    counts
        .into_iter()
        .find(|(_, n)| n * 2 > live)
        .map(|(v, _)| v)
}

impl Cluster {
    pub fn tables_prefix(&self) -> String {
        format!("{}tables/", self.config.prefix())
    }

    /// Where this node publishes its fingerprints.
    pub fn tables_key(&self) -> String {
        format!("{}{}", self.tables_prefix(), self.config.node)
    }

    /// A peer's fingerprints published (`Some`) or gone with its lease
    /// (`None`). This node's own key is not a peer.
    pub fn set_peer_tables(&self, node: &str, tables: Option<Fingerprints>) {
        if node == self.config.node {
            return;
        }
        let mut peers = lock(&self.peer_tables);
        match tables {
            Some(t) => peers.insert(node.to_string(), t),
            None => peers.remove(node),
        };
    }

    /// Every peer's fingerprints at once (after a resync).
    pub fn set_all_peer_tables(&self, mut all: BTreeMap<String, Fingerprints>) {
        all.remove(&self.config.node);
        *lock(&self.peer_tables) = all;
    }

    /// The nodes whose lease holds (they published verdicts or
    /// fingerprints), this one included.
    pub fn live_nodes(&self) -> BTreeSet<String> {
        let mut live: BTreeSet<String> = lock(&self.peers).keys().cloned().collect();
        live.extend(lock(&self.peer_tables).keys().cloned());
        live.insert(self.config.node.clone());
        live
    }

    /// Each service's cluster fingerprint: the one a strict majority of
    /// the live nodes hold, `own` (this node's installed tables) counting
    /// once the node has synced. Services without a majority are absent.
    pub fn cluster_fingerprints(&self, own: &Fingerprints) -> Fingerprints {
        let live = self.live_nodes().len();
        let peers = lock(&self.peer_tables);
        let mine = self.is_synced().then_some(own);
        let services: BTreeSet<&String> =
            peers.values().chain(mine).flat_map(|f| f.keys()).collect();
        services
            .into_iter()
            .filter_map(|s| {
                let held = peers
                    .values()
                    .chain(mine)
                    .filter_map(|f| f.get(s).map(String::as_str));
                Some((s.clone(), majority(live, held)?.to_string()))
            })
            .collect()
    }

    /// The reconcile loop has taken etcd's services since the daemon
    /// started (applied them, or refused a revision this node cannot run).
    pub fn is_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn mark_synced(&self) {
        self.synced.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_value_is_held_by_a_strict_majority_of_live_nodes() {
        assert_eq!(majority(3, ["a", "a", "b"]), Some("a"));
        assert_eq!(majority(3, ["a", "b", "c"]), None);
        // Two of four is no majority; nodes without a value count against.
        assert_eq!(majority(4, ["a", "a", "b", "b"]), None);
        assert_eq!(majority(3, ["a"]), None);
        assert_eq!(majority(3, ["a", "a"]), Some("a"));
        // A 2-node split has none; a lone node is its own majority.
        assert_eq!(majority(2, ["a", "b"]), None);
        assert_eq!(majority(1, ["a"]), Some("a"));
        assert_eq!(majority(0, []), None);
    }

    fn fp(v: &str) -> Fingerprints {
        [("web".to_string(), v.to_string())].into()
    }

    #[test]
    fn the_cluster_fingerprint_counts_live_nodes_and_this_one_once_synced() {
        let c = crate::cluster::test_cluster();
        // Alone and not synced: no vote, no majority.
        assert_eq!(c.cluster_fingerprints(&fp("x")).get("web"), None);
        c.mark_synced();
        assert_eq!(c.cluster_fingerprints(&fp("x"))["web"], "x");
        // Three live nodes (c published verdicts only): x, y and nothing.
        c.set_peer("c", Some(crate::state::Verdicts::new()));
        c.set_peer_tables("b", Some(fp("y")));
        assert_eq!(c.live_nodes().len(), 3);
        assert_eq!(c.cluster_fingerprints(&fp("x")).get("web"), None);
        c.set_peer_tables("c", Some(fp("y")));
        assert_eq!(c.cluster_fingerprints(&fp("x"))["web"], "y");
        // This node's own key is never a peer's.
        c.set_peer_tables("a", Some(fp("z")));
        assert_eq!(c.cluster_fingerprints(&fp("x"))["web"], "y");
        // b's lease expired: x and y of 2, nobody's.
        c.set_peer_tables("b", None);
        assert_eq!(c.cluster_fingerprints(&fp("x")).get("web"), None);
        assert_eq!(decode(&encode(&fp("q"))).unwrap(), fp("q"));
    }
}
