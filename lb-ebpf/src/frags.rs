//! Fragmented datagrams: later fragments carry no ports, so they follow the
//! backend their first fragment was given. The first fragment's pick is
//! remembered in `LB_FRAGS` (an LRU update, only for first fragments); a
//! later fragment looks it up (an LRU lookup, only for later fragments).
//! Unfragmented packets never reach this module.
use core::mem::MaybeUninit;

use lb_common::{BACKEND_UNUSED, BackendEntry, FragKey, FragValue, Reason, ServiceEntry};

use crate::{
    maps::{LB_BACKENDS, LB_FRAGS, LB_SERVICES},
    parse::Packet,
    select::proto_word,
};

#[inline(always)]
fn key(p: &Packet) -> FragKey {
    let mut k = MaybeUninit::<FragKey>::uninit();
    let k = k.as_mut_ptr();
    // SAFETY: every byte is written before it is read, `proto` with its
    // pad bytes as one word (offset 36, 4-aligned), as in `flow_key`.
    unsafe {
        (&raw mut (*k).src).write(p.src);
        (&raw mut (*k).dst).write(p.dst);
        (&raw mut (*k).id).write(p.frag_id);
        (&raw mut (*k).proto)
            .cast::<u32>()
            .write(proto_word(p.proto));
        k.read()
    }
}

/// Records where a first fragment went.
#[inline(always)]
pub fn remember(p: &Packet, service: u32, backend: u32) {
    let v = FragValue { service, backend };
    // A failed insert only costs the later fragments their balancing:
    // they are passed, counted as `fragment_unknown`.
    let _ = LB_FRAGS.insert(&key(p), &v, 0);
}

pub struct Recalled {
    pub service: u32,
    pub svc: &'static ServiceEntry,
    pub backend: u32,
    pub entry: &'static BackendEntry,
}

/// Where the later fragment `p`'s first fragment went, if it was balanced
/// here and is still remembered, and its backend still belongs to the
/// service.
#[inline(always)]
pub fn recall(p: &Packet) -> Result<Recalled, Reason> {
    let v = unsafe { LB_FRAGS.get(&key(p)) }.ok_or(Reason::FragmentUnknown)?;
    let (service, backend) = (v.service, v.backend);
    let svc = LB_SERVICES.get(service).ok_or(Reason::FragmentUnknown)?;
    let entry = LB_BACKENDS.get(backend).ok_or(Reason::FragmentUnknown)?;
    if entry.state == BACKEND_UNUSED || entry.service != service {
        return Err(Reason::FragmentUnknown);
    }
    Ok(Recalled {
        service,
        svc,
        backend,
        entry,
    })
}
