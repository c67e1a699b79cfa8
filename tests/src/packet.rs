//! Frames for packet fixtures: a builder that computes every checksum from
//! scratch, and a checker that recomputes them, so the data plane's
//! incremental updates are judged against full ones.
use std::net::IpAddr;

pub const ETH_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const ETH_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP echo request (ICMPv6 for IPv6 packets).
    Icmp,
    /// An ICMP error (ICMPv6 for IPv6 packets): type, code and the four
    /// bytes after the checksum (`info`: the next-hop MTU of "fragmentation
    /// needed" and "packet too big"). The payload is the quoted packet;
    /// see [`Spec::icmp_error`].
    IcmpError {
        kind: u8,
        code: u8,
        info: u32,
    },
}

/// ICMP "destination unreachable", code "fragmentation needed".
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PORT_UNREACH: u8 = 4;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;

/// A packet to build. Defaults: no VLAN, no options, not a fragment.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub vlan: Option<u16>,
    /// IPv4 options, padded by the builder to a multiple of four bytes.
    pub ip_options: Vec<u8>,
    /// IPv6 extension headers (type, body without the two leading bytes),
    /// bodies padded to a multiple of eight bytes.
    pub ext_headers: Vec<(u8, Vec<u8>)>,
    /// (fragment offset in 8-byte units, more fragments).
    pub fragment: Option<(u16, bool)>,
    /// Fragment identification (IPv4: the low 16 bits); 0x1234 (IPv4) or
    /// 0xabcd (IPv6 fragment header) if unset.
    pub frag_id: Option<u32>,
    /// Leave the IPv4 UDP checksum zero ("none").
    pub udp_zero_checksum: bool,
    /// (destination, source) MAC addresses; `ETH_DST`, `ETH_SRC` if unset.
    pub macs: Option<([u8; 6], [u8; 6])>,
}

impl Spec {
    pub fn new(src: &str, dst: &str, l4: L4) -> Self {
        Self {
            src: src.parse().expect("source address"),
            dst: dst.parse().expect("destination address"),
            l4,
            payload: Vec::new(),
            vlan: None,
            ip_options: Vec::new(),
            ext_headers: Vec::new(),
            fragment: None,
            frag_id: None,
            udp_zero_checksum: false,
            macs: None,
        }
    }

    /// The same packet between other MAC addresses.
    pub fn with_macs(mut self, dst: [u8; 6], src: [u8; 6]) -> Self {
        self.macs = Some((dst, src));
        self
    }

    /// The same packet to another address and port.
    pub fn with_dst(mut self, dst: &str, port: u16) -> Self {
        self.dst = dst.parse().expect("destination address");
        self.with_dport(port)
    }

    /// The same packet from another address and port.
    pub fn with_src(mut self, src: &str, port: u16) -> Self {
        self.src = src.parse().expect("source address");
        self.with_sport(port)
    }

    pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    pub fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    /// The same packet with another destination port.
    pub fn with_dport(mut self, port: u16) -> Self {
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
            L4::Icmp | L4::IcmpError { .. } => {}
        }
        self
    }

    /// The same packet with another source port.
    pub fn with_sport(mut self, port: u16) -> Self {
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
            L4::Icmp | L4::IcmpError { .. } => {}
        }
        self
    }

    pub fn with_flags(mut self, f: u8) -> Self {
        if let L4::Tcp { flags, .. } = &mut self.l4 {
            *flags = f;
        }
        self
    }

    pub fn build(&self) -> Vec<u8> {
        build(self)
    }

    /// The IP packet alone (the frame without Ethernet and VLAN headers),
    /// as an ICMP error quotes it.
    pub fn ip_packet(&self) -> Vec<u8> {
        let f = build(self);
        f[if self.vlan.is_some() { 18 } else { 14 }..].to_vec()
    }

    /// An ICMP error from `src` to `dst` quoting the first `quote_len`
    /// bytes of `quoted`'s IP packet (all of it if shorter).
    pub fn icmp_error(
        src: &str,
        dst: &str,
        (kind, code, info): (u8, u8, u32),
        quoted: &Spec,
        quote_len: usize,
    ) -> Self {
        let mut q = quoted.ip_packet();
        q.truncate(quote_len);
        Self::new(src, dst, L4::IcmpError { kind, code, info }).payload(&q)
    }
}

fn sum16(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    sum
}

fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum16(data))
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed address families"),
    }
    sum16(&p)
}

/// Builds the frame with all lengths and checksums computed in full.
pub fn build(s: &Spec) -> Vec<u8> {
    let v6 = s.src.is_ipv6();
    let (proto, mut l4) = match s.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
        } => {
            let mut h = Vec::new();
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&0x1000_0000u32.to_be_bytes());
            h.extend_from_slice(
                &(if flags & TCP_ACK != 0 {
                    0x2000_0000u32
                } else {
                    0
                })
                .to_be_bytes(),
            );
            h.extend_from_slice(&[0x50, flags]);
            h.extend_from_slice(&0xffffu16.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 0]);
            (6u8, h)
        }
        L4::Udp { sport, dport } => {
            let mut h = Vec::new();
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&((8 + s.payload.len()) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            (17u8, h)
        }
        L4::Icmp => (
            if v6 { 58u8 } else { 1u8 },
            vec![if v6 { 128 } else { 8 }, 0, 0, 0, 0, 1, 0, 1],
        ),
        L4::IcmpError { kind, code, info } => {
            let mut h = vec![kind, code, 0, 0];
            h.extend_from_slice(&info.to_be_bytes());
            (if v6 { 58u8 } else { 1u8 }, h)
        }
    };
    l4.extend_from_slice(&s.payload);
    let csum_at = match s.l4 {
        L4::Tcp { .. } => 16,
        L4::Udp { .. } => 6,
        L4::Icmp | L4::IcmpError { .. } => 2,
    };
    let csum = match s.l4 {
        L4::Icmp | L4::IcmpError { .. } if !v6 => checksum(&l4),
        _ => finish(pseudo_sum(s.src, s.dst, proto, l4.len()) + sum16(&l4)),
    };
    let csum = match s.l4 {
        L4::Udp { .. } if s.udp_zero_checksum && !v6 => 0,
        L4::Udp { .. } if csum == 0 => 0xffff,
        _ => csum,
    };
    l4[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());

    let mut frame = Vec::new();
    let (dst_mac, src_mac) = s.macs.unwrap_or((ETH_DST, ETH_SRC));
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    if let Some(tci) = s.vlan {
        frame.extend_from_slice(&0x8100u16.to_be_bytes());
        frame.extend_from_slice(&tci.to_be_bytes());
    }
    match (s.src, s.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut opts = s.ip_options.clone();
            while !opts.len().is_multiple_of(4) {
                opts.push(0);
            }
            let ihl = 5 + opts.len() / 4;
            let total = ihl * 4 + l4.len();
            let mut ip = vec![(4 << 4) | ihl as u8, 0];
            ip.extend_from_slice(&(total as u16).to_be_bytes());
            ip.extend_from_slice(&(s.frag_id.unwrap_or(0x1234) as u16).to_be_bytes());
            let frag = match s.fragment {
                Some((off, more)) => off | if more { 0x2000 } else { 0 },
                None => 0x4000, // don't fragment
            };
            ip.extend_from_slice(&frag.to_be_bytes());
            ip.extend_from_slice(&[64, proto, 0, 0]);
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&dst.octets());
            ip.extend_from_slice(&opts);
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut exts = Vec::new();
            let mut headers: Vec<(u8, Vec<u8>)> = s.ext_headers.clone();
            if let Some((off, more)) = s.fragment {
                let v = (off << 3) | more as u16;
                let mut body = v.to_be_bytes().to_vec();
                body.extend_from_slice(&s.frag_id.unwrap_or(0xabcd).to_be_bytes());
                headers.push((44, body));
            }
            let first = headers.first().map(|h| h.0).unwrap_or(proto);
            for (i, (_, body)) in headers.iter().enumerate() {
                let next = headers.get(i + 1).map(|h| h.0).unwrap_or(proto);
                let mut body = body.clone();
                if headers[i].0 == 44 {
                    exts.push(next);
                    exts.push(0);
                    exts.extend_from_slice(&body);
                    continue;
                }
                while !(body.len() + 2).is_multiple_of(8) {
                    body.push(0);
                }
                exts.push(next);
                exts.push(((body.len() + 2) / 8 - 1) as u8);
                exts.extend_from_slice(&body);
            }
            let payload_len = exts.len() + l4.len();
            frame.extend_from_slice(&0x6000_0000u32.to_be_bytes());
            frame.extend_from_slice(&(payload_len as u16).to_be_bytes());
            frame.extend_from_slice(&[first, 64]);
            frame.extend_from_slice(&src.octets());
            frame.extend_from_slice(&dst.octets());
            frame.extend_from_slice(&exts);
        }
        _ => panic!("mixed address families"),
    }
    frame.extend_from_slice(&l4);
    frame
}

/// One UDP datagram in three fragments: the first (offset 0, more
/// fragments) with the UDP header, then two with none. The builder writes a
/// "UDP header" into the later ones too: there it is payload, made to look
/// like other ports so a program that read ports there would go wrong.
pub fn udp_fragments(src: &str, dst: &str, sport: u16, dport: u16, id: u32) -> [Spec; 3] {
    let mut first = Spec::udp(src, dst, sport, dport).payload(&[0x5a; 48]);
    first.fragment = Some((0, true));
    first.frag_id = Some(id);
    let later = |off: u16, more: bool| {
        let mut s = Spec::udp(src, dst, 0x4142, 0x4344).payload(&[0xa5; 40]);
        s.fragment = Some((off, more));
        s.frag_id = Some(id);
        s
    };
    // 56 bytes (7 units) in the first, 48 (6 units) in the second.
    [first, later(7, true), later(13, false)]
}

/// A copy of an IPv4 or IPv6 frame (no VLAN tag) with another destination
/// address, the IPv4 header checksum recomputed in full. Nothing else
/// changes: for a non-first fragment that is all a rewrite may touch.
pub fn with_dst_addr(frame: &[u8], dst: IpAddr) -> Vec<u8> {
    let mut f = frame.to_vec();
    match dst {
        IpAddr::V4(a) => {
            assert_eq!(&f[12..14], &[0x08, 0x00], "an IPv4 frame");
            f[30..34].copy_from_slice(&a.octets());
            let ihl = (f[14] & 0xf) as usize * 4;
            f[24..26].copy_from_slice(&[0, 0]);
            let c = checksum(&f[14..14 + ihl]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        IpAddr::V6(a) => {
            assert_eq!(&f[12..14], &[0x86, 0xdd], "an IPv6 frame");
            f[38..54].copy_from_slice(&a.octets());
        }
    }
    f
}

/// A copy of a frame between other MAC addresses.
pub fn with_macs(frame: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

/// An ARP request.
pub fn arp() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&ETH_SRC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&ETH_SRC);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 1]);
    f
}

/// What a test wants to know of a TCP/UDP frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub l3_off: usize,
    pub l4_off: usize,
}

/// Parses Ethernet (+VLAN), IPv4/IPv6 (+extension headers), TCP/UDP.
pub fn parse(f: &[u8]) -> Option<Parsed> {
    let mut off = 12;
    let mut et = u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]);
    off += 2;
    if et == 0x8100 {
        et = u16::from_be_bytes([*f.get(off + 2)?, *f.get(off + 3)?]);
        off += 4;
    }
    let l3_off = off;
    let (src, dst, mut proto, mut l4_off): (IpAddr, IpAddr, u8, usize) = match et {
        0x0800 => {
            let ihl = (*f.get(off)? & 0xf) as usize * 4;
            let s: [u8; 4] = f.get(off + 12..off + 16)?.try_into().ok()?;
            let d: [u8; 4] = f.get(off + 16..off + 20)?.try_into().ok()?;
            (s.into(), d.into(), *f.get(off + 9)?, off + ihl)
        }
        0x86dd => {
            let s: [u8; 16] = f.get(off + 8..off + 24)?.try_into().ok()?;
            let d: [u8; 16] = f.get(off + 24..off + 40)?.try_into().ok()?;
            (s.into(), d.into(), *f.get(off + 6)?, off + 40)
        }
        _ => return None,
    };
    while matches!(proto, 0 | 43 | 60 | 44) {
        let next = *f.get(l4_off)?;
        l4_off += if proto == 44 {
            8
        } else {
            (*f.get(l4_off + 1)? as usize + 1) * 8
        };
        proto = next;
    }
    Some(Parsed {
        src,
        dst,
        proto,
        sport: u16::from_be_bytes([*f.get(l4_off)?, *f.get(l4_off + 1)?]),
        dport: u16::from_be_bytes([*f.get(l4_off + 2)?, *f.get(l4_off + 3)?]),
        l3_off,
        l4_off,
    })
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum in full and
/// says which one is wrong, if any. A zero IPv4 UDP checksum is accepted.
pub fn verify_checksums(f: &[u8]) -> Result<(), String> {
    let p = parse(f).ok_or("not a TCP/UDP frame")?;
    if p.src.is_ipv4() {
        let ihl = (f[p.l3_off] & 0xf) as usize * 4;
        if checksum(&f[p.l3_off..p.l3_off + ihl]) != 0 {
            return Err("IPv4 header checksum is wrong".into());
        }
    }
    let l4 = &f[p.l4_off..];
    let l4_len = if p.src.is_ipv4() {
        let total = u16::from_be_bytes([f[p.l3_off + 2], f[p.l3_off + 3]]) as usize;
        total - (p.l4_off - p.l3_off)
    } else {
        let payload = u16::from_be_bytes([f[p.l3_off + 4], f[p.l3_off + 5]]) as usize;
        payload + 40 - (p.l4_off - p.l3_off)
    };
    let l4 = &l4[..l4_len];
    if p.proto == 17 && p.src.is_ipv4() && l4[6] == 0 && l4[7] == 0 {
        return Ok(());
    }
    if finish(pseudo_sum(p.src, p.dst, p.proto, l4.len()) + sum16(l4)) != 0 {
        return Err(format!(
            "{} checksum is wrong",
            if p.proto == 6 { "TCP" } else { "UDP" }
        ));
    }
    Ok(())
}
