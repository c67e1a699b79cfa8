use crate::{
    config::{BackendConfig, ServiceConfig},
    dataplane::{AdminState, Forwarding, Protocol},
    state::{self, Saved},
};

fn svc(weights: &[u16]) -> Vec<ServiceConfig> {
    vec![ServiceConfig {
        name: "web".into(),
        listen: "0.0.0.0:443".parse().unwrap(),
        protocols: vec![Protocol::Tcp],
        forwarding: Forwarding::Local,
        health: None,
        when_all_down: Default::default(),
        allowed_backend_networks: Vec::new(),
        backends: weights
            .iter()
            .enumerate()
            .map(|(i, w)| BackendConfig {
                address: format!("127.0.0.1:{}", 8001 + i).parse().unwrap(),
                weight: *w,
                state: AdminState::Active,
                server_id: None,
            })
            .collect(),
        quic: None,
    }]
}

#[test]
fn api_changes_apply_only_on_the_config_they_were_made_on() {
    let (base, changed) = (svc(&[100, 100]), svc(&[7, 100]));
    let saved = |base: &[ServiceConfig]| Saved {
        fingerprint: Some(state::fingerprint(base)),
        base: base.to_vec(),
        changed: Some(changed.clone()),
        health: Default::default(),
        server_ids: Default::default(),
    };
    // Same config: the changes come back.
    let (services, dropped, _) = super::resolve(&base, Some(saved(&base)));
    assert_eq!((services, dropped.len()), (changed.clone(), 0));
    // Edited config: it wins and the dropped change is named.
    let edited = svc(&[100, 100, 100]);
    let (services, dropped, _) = super::resolve(&edited, Some(saved(&base)));
    assert_eq!(services, edited);
    assert_eq!(
        dropped,
        ["service web: backend 127.0.0.1:8001 weight 100 -> 7"]
    );
    // A version 1 file (no fingerprint): the config wins, said once.
    let mut old = saved(&base);
    old.fingerprint = None;
    let (services, dropped, _) = super::resolve(&base, Some(old));
    assert_eq!((services, dropped.len()), (base.clone(), 1));
    // No file, or no change: the config.
    assert_eq!(super::resolve(&base, None).0, base);
}

fn event(port: u16) -> super::HealthEvent {
    super::HealthEvent {
        service: "web".into(),
        backend: format!("127.0.0.1:{port}").parse().unwrap(),
        healthy: false,
        reason: "test".into(),
    }
}

/// Verdicts close together make one batch; a pause ends it; a steady
/// stream is cut at `BATCH_MAX`.
#[tokio::test]
async fn health_verdicts_are_batched_by_time() {
    use std::time::{Duration, Instant};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let feed = tokio::spawn(async move {
        // 10 verdicts 5 ms apart, a 200 ms pause, then one every 20 ms
        // for 600 ms.
        for i in 0..10 {
            tx.send(event(i)).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 0..30 {
            tx.send(event(100 + i)).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let first = rx.recv().await.unwrap();
    let batch = super::reconcile::collect_batch(first, &mut rx).await;
    assert_eq!(batch.len(), 10);
    let first = rx.recv().await.unwrap();
    let started = Instant::now();
    let batch = super::reconcile::collect_batch(first, &mut rx).await;
    let took = started.elapsed();
    assert!(
        took < super::BATCH_MAX + Duration::from_millis(40),
        "{took:?}"
    );
    assert!((8..=14).contains(&batch.len()), "{}", batch.len());
    feed.abort();
}

#[test]
fn progress_stalls_only_while_work_waits() {
    let mut p = super::Progress::default();
    assert!(p.since.is_none());
    p.queued();
    p.queued();
    assert_eq!(p.pending, 2);
    let first = p.since.unwrap();
    p.progressed();
    assert!(p.since.unwrap() >= first, "progress restarts the clock");
    p.progressed();
    assert!(p.since.is_none());
    p.progressed();
    assert_eq!(p.pending, 0);
}

#[test]
fn progress_gauges_are_zero_when_idle_and_age_while_work_waits() {
    let mut p = super::Progress::default();
    let now = std::time::Instant::now();
    assert_eq!(p.gauges(now), (0, 0.0));
    p.queued();
    let queued = p.since.unwrap();
    let later = queued + std::time::Duration::from_millis(2500);
    assert_eq!(p.gauges(later), (1, 2.5));
    p.queued();
    assert_eq!(p.gauges(later), (2, 2.5), "the oldest wait counts");
    p.progressed();
    p.progressed();
    assert_eq!(p.gauges(later), (0, 0.0));
}

#[test]
fn finds_the_default_routes_devices() {
    let v4 = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
              eth1\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
              eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
    assert_eq!(super::default_route_devices(v4, false), ["eth1"]);
    let v6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 \
              00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n\
              00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
              fd000000000000000000000000000001 00000400 00000002 00000000 00000003 eth2\n\
              00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
              00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
    assert_eq!(super::default_route_devices(v6, true), ["eth2"]);
}
