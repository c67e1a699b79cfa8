//! Addresses in the data plane's form: four native-order words, IPv4 as
//! IPv4-mapped IPv6.

use std::net::IpAddr;

use lb_common::Addr;

/// Converts an address to the data plane's form (IPv4 as IPv4-mapped).
pub fn addr_words(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    octets_addr(&v6.octets())
}

/// The other way round.
pub fn words_addr(words: &Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr_octets(words));
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The 16 bytes of an address in the data plane's form, in the order they
/// sit in memory (network order, as in the packet).
pub fn addr_octets(words: &Addr) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    o
}

/// The other way round, from the first 16 bytes of `o`.
pub fn octets_addr(o: &[u8]) -> Addr {
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_words_round_trip() {
        for ip in ["10.1.2.3", "fd00::1", "::", "0.0.0.0", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(words_addr(&addr_words(ip)), ip);
        }
        let w = addr_words("10.1.2.3".parse().unwrap());
        assert!(lb_common::is_v4_mapped(&w));
        assert_eq!(w[3].to_ne_bytes(), [10, 1, 2, 3]);
    }
}
