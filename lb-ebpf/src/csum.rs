//! Incremental Internet checksum updates (RFC 1624). Operands are in packet
//! byte order; the one's-complement sum does not care which order that is.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace16(csum: u16, old: u16, new: u16) -> u16 {
    !fold((!csum) as u32 + (!old) as u32 + new as u32)
}

/// The checksum after a 32-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace32(csum: u16, old: u32, new: u32) -> u16 {
    let sum = (!csum) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new as u16) as u32
        + (new >> 16);
    !fold(sum)
}

/// The checksum after a 128-bit address changed.
#[inline(always)]
pub fn replace128(csum: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut c = csum;
    c = replace32(c, old[0], new[0]);
    c = replace32(c, old[1], new[1]);
    c = replace32(c, old[2], new[2]);
    replace32(c, old[3], new[3])
}
