//! The kind of an interface (`veth`, `bridge`, ...; none for a physical
//! NIC) as rtnetlink's `IFLA_INFO_KIND` names it, asked in the calling
//! thread's network namespace: what `auto` attaches depends on it.
use rustix::net;

// From <linux/rtnetlink.h> and <linux/if_link.h>.
const RTM_GETLINK: u16 = 18;
const RTM_NEWLINK: u16 = 16;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

/// The kind of interface `iface`, or `None` when it has none (a physical
/// device) or cannot be asked.
pub fn link_kind(iface: &str) -> Option<String> {
    let index = nix::net::if_::if_nametoindex(iface).ok()?;
    let fd = net::socket_with(
        net::AddressFamily::NETLINK,
        net::SocketType::RAW,
        net::SocketFlags::CLOEXEC,
        None, // NETLINK_ROUTE
    )
    .ok()?;
    let mut req = Vec::with_capacity(NLMSG_HDR + IFINFOMSG);
    req.extend_from_slice(&((NLMSG_HDR + IFINFOMSG) as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    // struct ifinfomsg: family, pad, type, index, flags, change.
    req.extend_from_slice(&[0, 0, 0, 0]);
    req.extend_from_slice(&(index as i32).to_ne_bytes());
    req.extend_from_slice(&[0; 8]);
    let kernel = net::netlink::SocketAddrNetlink::new(0, 0);
    net::sendto(&fd, &req, net::SendFlags::empty(), &kernel).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let (_, n) = net::recv(&fd, &mut buf[..], net::RecvFlags::empty()).ok()?;
    kind_in_reply(&buf[..n.min(buf.len())])
}

/// `IFLA_INFO_KIND` inside `IFLA_LINKINFO` of an RTM_NEWLINK reply.
fn kind_in_reply(buf: &[u8]) -> Option<String> {
    let u16_at = |b: &[u8], at: usize| Some(u16::from_ne_bytes([*b.get(at)?, *b.get(at + 1)?]));
    let len = u32::from_ne_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
    let kind = u16_at(buf, 4)?;
    if kind == NLMSG_ERROR || kind != RTM_NEWLINK {
        return None;
    }
    let msg = buf.get(..len)?;
    let linkinfo = attr(msg.get(NLMSG_HDR + IFINFOMSG..)?, IFLA_LINKINFO)?;
    let name = attr(linkinfo, IFLA_INFO_KIND)?;
    let name = name.split(|b| *b == 0).next()?;
    Some(String::from_utf8_lossy(name).into_owned())
}

/// The payload of the first attribute of type `want` in `attrs`.
fn attr(mut attrs: &[u8], want: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == want {
            return Some(&attrs[4..len]);
        }
        let step = (len + 3) & !3;
        attrs = attrs.get(step.min(attrs.len())..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_no_kind() {
        assert_eq!(link_kind("lo"), None);
        assert_eq!(link_kind("no-such-if0"), None);
    }

    #[test]
    fn the_kind_is_read_from_the_nested_link_info() {
        let mut msg = vec![0u8; NLMSG_HDR + IFINFOMSG];
        msg[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
        // IFLA_MTU first, then IFLA_LINKINFO { IFLA_INFO_KIND "veth" }.
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&4u16.to_ne_bytes());
        msg.extend_from_slice(&1500u32.to_ne_bytes());
        msg.extend_from_slice(&16u16.to_ne_bytes());
        msg.extend_from_slice(&(IFLA_LINKINFO | 0x8000).to_ne_bytes());
        msg.extend_from_slice(&9u16.to_ne_bytes());
        msg.extend_from_slice(&IFLA_INFO_KIND.to_ne_bytes());
        msg.extend_from_slice(b"veth\0\0\0\0");
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(kind_in_reply(&msg).as_deref(), Some("veth"));
        msg[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(kind_in_reply(&msg), None);
    }
}
