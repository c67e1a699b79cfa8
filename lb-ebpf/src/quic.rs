//! QUIC-LB routing: a short-header packet to a service with a QUIC-LB
//! config goes to the backend whose server id its destination CID carries,
//! whatever its 4-tuple; everything else falls back to the 4-tuple pick.
//! Encrypted CIDs are decrypted by `lb_xdp_quic_decrypt` (tail call), which
//! has a stack of its own for AES.
//!
//! Map lookups, and why: `LB_QUIC_SVCS` (array) for UDP packets of a
//! service; `LB_QUIC_SIDS` (hash) only for a routable CID; `LB_AES` and
//! `LB_QUIC_SCRATCH` (arrays) only in encrypted mode.
use aya_ebpf::{bindings::xdp_action::XDP_PASS, macros::xdp, programs::XdpContext};
use lb_common::{
    PROTO_UDP, Reason, ServiceEntry,
    quic::{
        CidMode, MAX_PLAINTEXT_LEN, PROG_DECRYPT, PROG_XDP, QUIC_ENABLED, QuicRoute, QuicScratch,
        QuicServiceEntry, QuicSidKey, SCRATCH_DONE, SCRATCH_IDLE, SCRATCH_REQUEST, open_server_id,
        quic_stats_index,
    },
};

use crate::{
    maps::{LB_AES, LB_QUIC_PROGS, LB_QUIC_SCRATCH, LB_QUIC_SIDS, LB_QUIC_STATS, LB_QUIC_SVCS},
    parse::{Bounds, Packet},
    select::{self, Pick},
};

const UDP_HDR_LEN: usize = 8;
/// The short header's first byte and the longest CID.
const WINDOW: usize = 1 + 1 + MAX_PLAINTEXT_LEN as usize;

/// How a caller can decrypt: `lb_xdp` tail-calls the decrypt program; the
/// TC ingress program cannot.
pub trait Decrypt {
    /// Enters the decrypt program; returns only if that failed.
    fn tail_call(&self);
}

impl Decrypt for XdpContext {
    #[inline(always)]
    fn tail_call(&self) {
        // SAFETY: a tail call with this program's own context; on success
        // it does not return, on failure the caller goes on.
        unsafe { LB_QUIC_PROGS.tail_call(self, PROG_DECRYPT) };
    }
}

/// No decryption (the TC ingress program).
pub struct NoDecrypt;

impl Decrypt for NoDecrypt {
    #[inline(always)]
    fn tail_call(&self) {}
}

/// Whether UDP packets of service `id` are routed by CID: then a reply
/// from any of its backends' ports answers a flow of the service (the
/// CID, not the 4-tuple, chose the backend).
#[inline(always)]
pub fn routes_by_cid(p: &Packet, id: u32) -> bool {
    p.proto == PROTO_UDP
        && LB_QUIC_SVCS
            .get(id)
            .is_some_and(|q| q.flags & QUIC_ENABLED != 0)
}

/// The backend by CID for a UDP packet of service `id`, or `None` for the
/// 4-tuple pick. Counted per service and route.
#[inline(always)]
pub fn route<D: Decrypt>(d: &D, b: &Bounds, p: &Packet, id: u32) -> Option<Pick> {
    if p.proto != PROTO_UDP {
        return None;
    }
    let q = LB_QUIC_SVCS.get(id)?;
    if q.flags & QUIC_ENABLED == 0 {
        return None;
    }
    let (route, pick) = match by_cid(d, b, p, id, q) {
        Ok(pick) => (QuicRoute::Cid, Some(pick)),
        Err(r) => (r, None),
    };
    if let Some(c) = LB_QUIC_STATS.get_ptr_mut(quic_stats_index(id, route)) {
        // SAFETY: a per-CPU counter of this CPU.
        unsafe { *c += 1 };
    }
    pick
}

/// The backend for a packet of service `id`: by CID where QUIC-LB routes
/// it, else the 4-tuple pick.
#[inline(always)]
pub fn pick<D: Decrypt>(
    d: &D,
    b: &Bounds,
    p: &Packet,
    id: u32,
    svc: &ServiceEntry,
) -> Result<Pick, Reason> {
    match route(d, b, p, id) {
        Some(pick) => Ok(pick),
        None => select::backend(p, id, svc, true),
    }
}

#[inline(always)]
fn by_cid<D: Decrypt>(
    d: &D,
    b: &Bounds,
    p: &Packet,
    id: u32,
    q: &QuicServiceEntry,
) -> Result<Pick, QuicRoute> {
    // One fixed-size read, first: every exit below then knows the same
    // packet range, which keeps the verifier's states few. A payload too
    // short for the window is too short for any QUIC short header (a packet
    // number and a 16-byte AEAD tag follow the CID).
    let w: *mut [u8; WINDOW] = b
        .ptr_at(p.l4_off + UDP_HDR_LEN)
        .map_err(|_| QuicRoute::TooShort)?;
    // SAFETY: `ptr_at` checked the whole window is inside the packet.
    let w = unsafe { *w };
    if w[0] & 0x80 != 0 {
        return Err(QuicRoute::LongHeader);
    }
    // Config 0b111 (unroutable) is never a service's: the daemon allows 0..=6.
    if w[1] >> 5 != q.config_id {
        return Err(QuicRoute::UnroutableConfig);
    }
    let server_id = if q.mode == CidMode::Plaintext as u8 {
        plain_server_id(&w, q.server_id_len)
    } else {
        decrypted(d, id, &w)?
    };
    let key = QuicSidKey {
        service: id,
        server_id,
    };
    // SAFETY: a hash lookup; the value is copied at once.
    let v = unsafe { LB_QUIC_SIDS.get(&key) }.ok_or(QuicRoute::UnknownServerId)?;
    let (backend, generation) = (v.backend, v.generation);
    let entry = select::holder(backend, id, generation).ok_or(QuicRoute::UnknownServerId)?;
    Ok(Pick {
        backend,
        entry,
        new_flow: false,
    })
}

/// The first `len` bytes after the first octet, zero-padded to 16, without
/// a branch per byte (two words and a mask).
#[inline(always)]
fn plain_server_id(w: &[u8; WINDOW], len: u8) -> [u8; 16] {
    let lo = u64::from_le_bytes([w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9]]);
    let hi = u64::from_le_bytes([w[10], w[11], w[12], w[13], w[14], w[15], w[16], w[17]]);
    let bits = u32::from(len.min(16)) * 8;
    let mask = |n: u32| {
        if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
    };
    let lo = lo & mask(bits);
    let hi = hi & mask(bits.saturating_sub(64));
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&lo.to_le_bytes());
    out[8..].copy_from_slice(&hi.to_le_bytes());
    out
}

/// The CID bytes after the first octet, as the scratch holds them.
#[inline(always)]
fn block_words(w: &[u8; WINDOW]) -> [u64; 3] {
    let mut b = [0u8; 24];
    b[..WINDOW - 2].copy_from_slice(&w[2..]);
    [
        u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u64::from_ne_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        u64::from_ne_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
    ]
}

/// The server id of an encrypted CID: the decrypt program's answer for
/// this service and these CID bytes if it has one, else a request to it
/// (the tail call re-enters `lb_xdp`, which then finds the answer).
#[inline(always)]
fn decrypted<D: Decrypt>(d: &D, id: u32, w: &[u8; WINDOW]) -> Result<[u8; 16], QuicRoute> {
    let s = LB_QUIC_SCRATCH
        .get_ptr_mut(0)
        .ok_or(QuicRoute::NotDecrypted)?;
    // SAFETY: this CPU's scratch; nothing else runs on it until this
    // program (or its tail calls) ends.
    let s = unsafe { &mut *s };
    let words = block_words(w);
    if s.state == SCRATCH_DONE && s.service == id && s.block == words {
        s.state = SCRATCH_IDLE;
        return if s.found != 0 {
            Ok(s.server_id)
        } else {
            Err(QuicRoute::NotDecrypted)
        };
    }
    s.state = SCRATCH_REQUEST;
    s.service = id;
    s.block = words;
    d.tail_call();
    s.state = SCRATCH_IDLE;
    Err(QuicRoute::NotDecrypted)
}

/// Decrypts the CID `lb_xdp` left in the scratch, then hands the packet
/// back to `lb_xdp`. Its own program, so AES has a whole stack.
#[xdp]
pub fn lb_xdp_quic_decrypt(ctx: XdpContext) -> u32 {
    if let Some(s) = LB_QUIC_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch (see `decrypted`).
        let s = unsafe { &mut *s };
        if s.state == SCRATCH_REQUEST {
            answer(s);
        }
    }
    // SAFETY: a tail call with this program's own context.
    unsafe { LB_QUIC_PROGS.tail_call(&ctx, PROG_XDP) };
    // `lb_xdp` is missing from the program array: the packet goes on
    // unbalanced rather than in a loop.
    XDP_PASS
}

#[inline(always)]
fn answer(s: &mut QuicScratch) {
    s.state = SCRATCH_DONE;
    s.found = 0;
    let (Some(q), Some(t)) = (LB_QUIC_SVCS.get(s.service), LB_AES.get(0)) else {
        return;
    };
    if q.flags & QUIC_ENABLED == 0 || q.mode != CidMode::Encrypted as u8 {
        return;
    }
    let mut block = [0u8; MAX_PLAINTEXT_LEN as usize];
    for (i, w) in s.block.iter().enumerate() {
        let bytes = w.to_ne_bytes();
        for j in 0..8 {
            let k = i * 8 + j;
            if k < block.len() {
                block[k] = bytes[j];
            }
        }
    }
    let sid_len = q.server_id_len.min(15);
    let nonce_len = q.nonce_len.min(MAX_PLAINTEXT_LEN - sid_len);
    open_server_id(t, &q.keys, sid_len, nonce_len, &block, &mut s.server_id);
    s.found = 1;
}
