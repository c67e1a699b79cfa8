use std::net::IpAddr;

use super::*;

fn key() -> Key {
    Key::new(b"0123456789abcdef0123456789abcdef")
}

fn pin(src: &str, sport: u16, backend: &str) -> Pin {
    let src: IpAddr = src.parse().unwrap();
    let dst: IpAddr = if src.is_ipv4() { "10.0.0.1" } else { "fd00::1" }
        .parse()
        .unwrap();
    Pin {
        key: FlowKey {
            src: addr_words(src),
            dst: addr_words(dst),
            sport: sport.to_be(),
            dport: 443u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        },
        backend: backend.parse().unwrap(),
    }
}

fn batch(seq: u64, unix_ms: u64) -> Batch {
    Batch {
        node: "node-1".into(),
        seq,
        unix_ms,
        pins: vec![
            pin("10.1.2.3", 40001, "10.2.0.11:443"),
            pin("fd00:1::7", 40002, "[fd00:2::11]:8443"),
        ],
    }
}

#[test]
fn a_batch_round_trips() {
    let b = batch(7, 1_700_000_000_000);
    let d = encode(&key(), &b);
    assert_eq!(
        d.len(),
        4 + 1 + 6 + 18 + 2 * PIN_BYTES + MAC_BYTES,
        "the layout's length"
    );
    assert_eq!(decode(&key(), &d).unwrap(), b);
    let full = Batch {
        pins: (0..MAX_PINS_PER_DATAGRAM as u16)
            .map(|i| pin("fd00:1::7", 1000 + i, "[fd00:2::11]:8443"))
            .collect(),
        ..b
    };
    let d = encode(&key(), &full);
    assert!(d.len() < 1300, "{} bytes", d.len());
    assert_eq!(decode(&key(), &d).unwrap(), full);
}

#[test]
fn any_change_or_another_key_fails_the_mac() {
    let d = encode(&key(), &batch(1, 5));
    let other = Key::new(b"another key of thirty-two bytes!");
    assert_eq!(decode(&other, &d), Err(WireError::BadMac));
    for i in 4..d.len() {
        let mut bad = d.clone();
        bad[i] ^= 0x01;
        assert_eq!(decode(&key(), &bad), Err(WireError::BadMac), "byte {i}");
    }
    // A MAC over a shorter prefix is still over the wrong bytes.
    assert_eq!(decode(&key(), &d[..d.len() - 1]), Err(WireError::BadMac));
    assert_eq!(decode(&key(), b"LBP1"), Err(WireError::Malformed));
    let mut magic = d.clone();
    magic[0] = b'X';
    assert_eq!(decode(&key(), &magic), Err(WireError::Malformed));
}

/// Signed but inconsistent (a count that does not match the bytes): only
/// a key holder could send it, and it is still refused.
#[test]
fn a_signed_datagram_with_a_wrong_count_is_malformed() {
    let mut b = encode(&key(), &batch(1, 5));
    b.truncate(b.len() - MAC_BYTES);
    let count_at = 4 + 1 + 6 + 16;
    b[count_at + 1] = 3;
    let tag = hmac::sign(&key().0, &b);
    b.extend_from_slice(tag.as_ref());
    assert_eq!(decode(&key(), &b), Err(WireError::Malformed));
}

#[test]
fn the_replay_window_takes_each_sequence_number_once() {
    let now = 1_700_000_000_000;
    let mut w = ReplayWindow::default();
    assert_eq!(w.accept(&batch(100, now), now), Ok(()));
    assert_eq!(w.accept(&batch(100, now), now), Err(ReplayError::Replayed));
    // Out of order within the window: once each.
    assert_eq!(w.accept(&batch(103, now), now), Ok(()));
    assert_eq!(w.accept(&batch(101, now), now), Ok(()));
    assert_eq!(w.accept(&batch(101, now), now), Err(ReplayError::Replayed));
    assert_eq!(w.accept(&batch(102, now), now), Ok(()));
    // Far ahead: everything before the window is refused.
    assert_eq!(w.accept(&batch(1000, now), now), Ok(()));
    assert_eq!(
        w.accept(&batch(1000 - REPLAY_WINDOW, now), now),
        Err(ReplayError::Replayed)
    );
    assert_eq!(w.accept(&batch(1000 - REPLAY_WINDOW + 1, now), now), Ok(()));
    // Another sender has its own window.
    let mut other = batch(100, now);
    other.node = "node-2".into();
    assert_eq!(w.accept(&other, now), Ok(()));
}

#[test]
fn stale_or_future_stamps_are_refused() {
    let now = 1_700_000_000_000;
    let skew = MAX_SKEW.as_millis() as u64;
    let mut w = ReplayWindow::default();
    assert_eq!(
        w.accept(&batch(1, now - skew - 1), now),
        Err(ReplayError::Skew(skew + 1))
    );
    assert_eq!(
        w.accept(&batch(2, now + skew + 5), now),
        Err(ReplayError::Skew(skew + 5))
    );
    assert_eq!(w.accept(&batch(3, now - skew), now), Ok(()));
}

#[test]
fn the_rate_cap_allows_a_second_s_worth_then_the_rate() {
    let t0 = Instant::now();
    let mut cap = RateCap::new(1000, t0);
    assert_eq!(cap.take(600, t0), 600);
    assert_eq!(cap.take(600, t0), 400);
    assert_eq!(cap.take(10, t0), 0);
    assert_eq!(cap.take(1000, t0 + Duration::from_millis(100)), 100);
    // Idle time never banks more than a second's worth.
    assert_eq!(cap.take(5000, t0 + Duration::from_secs(60)), 1000);
}

#[test]
fn a_short_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k");
    std::fs::write(&p, "short\n").unwrap();
    assert!(matches!(
        Key::from_file(&p),
        Err(KeyError::Short { len: 5, .. })
    ));
    std::fs::write(&p, format!("{}\n", "k".repeat(44))).unwrap();
    assert!(Key::from_file(&p).is_ok());
    assert!(matches!(
        Key::from_file(&dir.path().join("none")),
        Err(KeyError::Read { .. })
    ));
}

#[test]
fn join_messages_round_trip_and_keep_their_kind() {
    let b = batch(9, 1_700_000_000_000);
    let ask = Batch {
        pins: Vec::new(),
        ..b.clone()
    };
    let kinds = [
        (Kind::Pins, b.clone()),
        (Kind::JoinRequest, ask.clone()),
        (Kind::JoinPins { request: 77 }, b.clone()),
        (
            Kind::JoinEnd {
                request: 77,
                pins: 1234,
            },
            ask.clone(),
        ),
    ];
    for (kind, batch) in &kinds {
        let d = encode_kind(&key(), *kind, batch);
        assert_eq!(
            decode_kind(&key(), &d),
            Ok((*kind, batch.clone())),
            "{kind:?}"
        );
        // The kind is under the MAC: another magic fails it.
        for (other, _) in &kinds {
            if other.magic() != kind.magic() {
                let mut forged = d.clone();
                forged[..4].copy_from_slice(&other.magic());
                assert_eq!(decode_kind(&key(), &forged), Err(WireError::BadMac));
            }
        }
    }
    // Only pin batches pass the pins-only decoder.
    let d = encode_kind(&key(), Kind::JoinPins { request: 1 }, &b);
    assert_eq!(decode(&key(), &d), Err(WireError::Malformed));
    // A request or an end marker carrying pins is refused, even signed.
    let d = encode_kind(&key(), Kind::JoinRequest, &b);
    assert_eq!(decode_kind(&key(), &d), Err(WireError::Malformed));
    let d = encode_kind(
        &key(),
        Kind::JoinEnd {
            request: 1,
            pins: 2,
        },
        &b,
    );
    assert_eq!(decode_kind(&key(), &d), Err(WireError::Malformed));
    // The join exchange falls under the same replay window.
    let now = 1_700_000_000_000;
    let mut w = ReplayWindow::default();
    assert_eq!(w.accept(&batch(5, now), now), Ok(()));
    let (_, replayed) = decode_kind(
        &key(),
        &encode_kind(
            &key(),
            Kind::JoinRequest,
            &Batch {
                seq: 5,
                unix_ms: now,
                ..ask
            },
        ),
    )
    .unwrap();
    assert_eq!(w.accept(&replayed, now), Err(ReplayError::Replayed));
}

fn peers(names: &[&str]) -> Vec<(String, SocketAddr)> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.to_string(),
                format!("10.9.0.{}:7946", i + 1).parse().unwrap(),
            )
        })
        .collect()
}

fn asked(step: JoinStep) -> Vec<(String, u64)> {
    match step {
        JoinStep::Ask(asks) => asks.into_iter().map(|(p, _, r)| (p, r)).collect(),
        other => panic!("expected requests, got {other:?}"),
    }
}

fn counter(from: u64) -> impl FnMut() -> u64 {
    let mut n = from;
    move || {
        n += 1;
        n
    }
}

#[test]
fn a_join_is_synced_once_every_peer_answers_whole() {
    let t0 = Instant::now();
    let mut j = Join::new(t0);
    let p = peers(&["b", "c"]);
    let mut seq = counter(10);
    assert_eq!(
        asked(j.next(&p, &mut seq, t0)),
        vec![("b".to_string(), 11), ("c".to_string(), 12)]
    );
    assert!(!j.done());
    let t = t0 + Duration::from_millis(10);
    assert_eq!(j.next(&p, &mut seq, t), JoinStep::Wait);
    // Pins of another request or from another node do not count.
    j.on_pins("c", 11, 20);
    j.on_pins("b", 9, 20);
    j.on_pins("b", 11, 20);
    j.on_pins("b", 11, 5);
    // An end marker for another request changes nothing.
    j.on_end("b", 9, 25);
    j.on_end("b", 11, 25);
    // One peer whole is not enough: the other may hold pins made before
    // their slot changed, which only it has.
    assert_eq!(j.next(&p, &mut seq, t), JoinStep::Wait);
    assert!(!j.done());
    j.on_end("c", 12, 0);
    assert_eq!(
        j.next(&p, &mut seq, t0 + Duration::from_millis(30)),
        JoinStep::Done
    );
    assert_eq!(
        j.outcome(),
        &JoinOutcome::Synced {
            peers: vec!["b".into(), "c".into()],
            pins: 25,
            missing: vec![]
        }
    );
    assert_eq!(
        j.next(&p, &mut seq, t0 + Duration::from_secs(9)),
        JoinStep::Done
    );
    let v = j.view();
    assert_eq!(
        (
            v.state.as_str(),
            v.peers.len(),
            v.pins,
            v.requests,
            v.took_ms
        ),
        ("synced", 2, 25, 2, Some(30))
    );
}

#[test]
fn a_lost_answer_is_asked_again_within_the_bound() {
    let t0 = Instant::now();
    let mut j = Join::new(t0);
    let p = peers(&["b", "c"]);
    let mut seq = counter(0);
    asked(j.next(&p, &mut seq, t0));
    // An answer that lost a datagram: asked again at once.
    j.on_pins("b", 1, 20);
    j.on_end("b", 1, 40);
    assert_eq!(asked(j.next(&p, &mut seq, t0)), vec![("b".to_string(), 3)]);
    // A late end marker of the earlier request does not count.
    j.on_end("b", 1, 0);
    // No answer at all: asked again after JOIN_ATTEMPT.
    let t1 = t0 + JOIN_ATTEMPT;
    assert_eq!(
        asked(j.next(&p, &mut seq, t1)),
        vec![("b".to_string(), 4), ("c".to_string(), 5)]
    );
    j.on_end("b", 4, 0);
    assert!(!j.done());
    // Past the bound the node announces with the answers it has.
    assert_eq!(j.next(&p, &mut seq, t0 + JOIN_BOUND), JoinStep::Done);
    assert_eq!(
        j.outcome(),
        &JoinOutcome::Synced {
            peers: vec!["b".into()],
            pins: 0,
            missing: vec!["c".into()]
        }
    );
    // None at all: timed out.
    let mut j = Join::new(t0);
    asked(j.next(&p, &mut seq, t0));
    assert_eq!(j.next(&p, &mut seq, t0 + JOIN_BOUND), JoinStep::Done);
    assert_eq!(j.outcome(), &JoinOutcome::TimedOut);
    assert_eq!(j.view().state, "timed_out");
}

#[test]
fn a_node_without_peers_joins_at_once() {
    let t0 = Instant::now();
    let mut j = Join::new(t0);
    assert_eq!(
        j.next(&[], || panic!("no request without a peer"), t0),
        JoinStep::Done
    );
    assert_eq!(j.outcome(), &JoinOutcome::NoPeer);
    assert_eq!(j.view().state, "no_peer");
    // A peer that left after being asked is not "no peer": the bound decides.
    let mut j = Join::new(t0);
    let mut seq = counter(0);
    asked(j.next(&peers(&["b"]), &mut seq, t0));
    assert_eq!(j.next(&[], &mut seq, t0 + JOIN_ATTEMPT), JoinStep::Wait);
    assert!(!j.done());
    assert_eq!(j.next(&[], &mut seq, t0 + JOIN_BOUND), JoinStep::Done);
    assert_eq!(j.outcome(), &JoinOutcome::TimedOut);
}
