//! The floor any balancer is measured against: parse Ethernet, IPv4/IPv6 and
//! TCP, swap the MAC addresses, and send the frame back out (`XDP_TX`). No
//! maps, no helpers. Beside it `sink`, which drops every frame: the far end
//! a veth needs for frames sent to it with `XDP_TX`. Built only for the
//! bench (bench/build.rs).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};

#[inline(always)]
fn fits(ctx: &XdpContext, off: usize, len: usize) -> bool {
    ctx.data() + off + len <= ctx.data_end()
}

#[xdp]
pub fn baseline(ctx: XdpContext) -> u32 {
    if !fits(&ctx, 0, 14) {
        return XDP_PASS;
    }
    let eth = ctx.data() as *mut [u8; 14];
    // SAFETY: `fits` proved the 14-byte Ethernet header lies inside the frame.
    let proto = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
    let l4 = match proto {
        0x0800 => {
            if !fits(&ctx, 14, 20) {
                return XDP_PASS;
            }
            // SAFETY: `fits` proved 20 bytes of IPv4 header after Ethernet.
            let vihl = unsafe { *((ctx.data() + 14) as *const u8) };
            14 + ((vihl & 0x0f) as usize) * 4
        }
        0x86dd => 14 + 40,
        _ => return XDP_PASS,
    };
    if !fits(&ctx, l4, 20) {
        return XDP_PASS;
    }
    // SAFETY: the same checked header; nothing else refers to the frame.
    let eth = unsafe { &mut *eth };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&eth[0..6]);
    eth.copy_within(6..12, 0);
    eth[6..12].copy_from_slice(&mac);
    XDP_TX
}

/// Drops every frame, so a veth peer's `XDP_TX` has somewhere to land.
#[xdp]
pub fn sink(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
