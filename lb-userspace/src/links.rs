//! Keeps the redirect map in step with the interfaces: a NETLINK_ROUTE
//! socket subscribed to link events wakes a thread that re-syncs
//! `LB_TX_PORTS`, logs interfaces that came and went, notices when the
//! attached interface itself is gone, and attaches again when it is back.
use std::{
    collections::BTreeMap,
    io,
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
};

use rustix::{io::Errno, net};
use tracing::{error, info, warn};

use crate::dataplane::{AttachMode, MapWriter, interfaces};

/// A socket that receives rtnetlink link messages (`RTMGRP_LINK`).
pub struct LinkEvents {
    fd: OwnedFd,
}

impl LinkEvents {
    pub fn open() -> io::Result<Self> {
        let fd = net::socket_with(
            net::AddressFamily::NETLINK,
            net::SocketType::RAW,
            net::SocketFlags::CLOEXEC,
            None, // NETLINK_ROUTE
        )?;
        net::bind(&fd, &net::netlink::SocketAddrNetlink::new(0, RTMGRP_LINK))?;
        Ok(Self { fd })
    }

    /// Blocks until messages arrive; true if one announced a new or
    /// removed link (or some were lost, so the caller must look anyway).
    pub fn wait(&self) -> io::Result<bool> {
        let mut buf = [0u8; 32 * 1024];
        match net::recv(&self.fd, &mut buf[..], net::RecvFlags::empty()) {
            Ok((_, n)) => Ok(has_link_change(&buf[..n.min(buf.len())])),
            Err(Errno::NOBUFS) => Ok(true),
            Err(Errno::INTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

// From <linux/rtnetlink.h>.
const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
#[cfg(test)]
const RTM_NEWADDR: u16 = 20;

/// Whether a batch of netlink messages holds an RTM_NEWLINK or RTM_DELLINK.
fn has_link_change(mut buf: &[u8]) -> bool {
    // struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if kind == RTM_NEWLINK || kind == RTM_DELLINK {
            return true;
        }
        let step = (len + 3) & !3;
        if len < 16 || step > buf.len() {
            break;
        }
        buf = &buf[step..];
    }
    false
}

/// Watches links on a thread of its own until the writer is dropped:
/// every change re-syncs the redirect map; `attached` says whether the
/// data plane is attached to `iface`. When that interface goes, the data
/// plane is reported detached; when an interface of that name comes back,
/// the programs are attached to it again (`mode`).
pub fn spawn_watcher(
    iface: String,
    mode: AttachMode,
    writer: Weak<Mutex<MapWriter>>,
    attached: Arc<AtomicBool>,
) -> io::Result<()> {
    let events = LinkEvents::open()?;
    std::thread::Builder::new()
        .name("lb-links".into())
        .spawn(move || {
            let mut known: BTreeMap<u32, String> =
                interfaces().unwrap_or_default().into_iter().collect();
            // Links that came between the attach and the subscription.
            let mut first = true;
            loop {
                match if first { Ok(true) } else { events.wait() } {
                    Ok(false) => continue,
                    Ok(true) => first = false,
                    Err(e) => {
                        error!(
                            "link events: {e}; interfaces added from now on are no redirect targets until `lb run` restarts"
                        );
                        return;
                    }
                }
                let Some(writer) = writer.upgrade() else {
                    return;
                };
                let now: BTreeMap<u32, String> = match interfaces() {
                    Ok(list) => list.into_iter().collect(),
                    Err(e) => {
                        warn!("{e}");
                        continue;
                    }
                };
                let synced = writer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .dataplane_mut()
                    .sync_tx_ports();
                if let Err(e) = &synced {
                    error!("updating the redirect map: {e}");
                }
                for (ifindex, name) in &now {
                    if !known.contains_key(ifindex) {
                        if synced.is_ok() {
                            info!(interface = %name, ifindex, "interface added; it is a redirect target");
                        } else {
                            info!(interface = %name, ifindex, "interface added");
                        }
                    }
                }
                for (ifindex, name) in &known {
                    if !now.contains_key(ifindex) {
                        info!(interface = %name, ifindex, "interface removed");
                    }
                }
                let present = now.values().any(|name| *name == iface);
                let was = attached.load(Ordering::SeqCst);
                if was && !present {
                    attached.store(false, Ordering::SeqCst);
                    error!(
                        interface = %iface,
                        "the interface the data plane is attached to is gone: no traffic is \
                         balanced until it comes back"
                    );
                } else if !was && present {
                    let done = match writer.lock() {
                        Ok(mut w) => w.dataplane_mut().reattach(&iface, mode).map_err(|e| e.to_string()),
                        Err(_) => Err("the map writer's lock is poisoned".to_string()),
                    };
                    match done {
                        Ok(()) => {
                            attached.store(true, Ordering::SeqCst);
                            info!(interface = %iface, "the interface is back; the data plane is attached again");
                        }
                        Err(e) => error!(interface = %iface, "attaching again: {e}"),
                    }
                }
                known = now;
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, len: u32) -> Vec<u8> {
        let mut m = vec![0u8; (len as usize).max(16)];
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m
    }

    #[test]
    fn link_messages_are_told_from_others() {
        assert!(has_link_change(&msg(RTM_NEWLINK, 32)));
        assert!(has_link_change(&msg(RTM_DELLINK, 16)));
        let mut two = msg(RTM_NEWADDR, 20);
        two.extend(msg(RTM_NEWLINK, 16));
        assert!(has_link_change(&two));
        assert!(!has_link_change(&msg(RTM_NEWADDR, 16)));
        assert!(!has_link_change(&[0u8; 8]));
        // A bogus length stops the walk instead of looping.
        assert!(!has_link_change(&msg(RTM_NEWADDR, 4)));
    }
}
