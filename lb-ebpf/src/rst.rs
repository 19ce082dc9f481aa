//! Refusing a TCP connection with a RST+ACK built in place from the client's SYN and sent
//! straight back (`XDP_TX`): the client fails at once instead of retrying into a timeout.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};

use crate::{
    csum,
    flow::{TCP_FIN, TCP_SYN},
    forward::copy_out,
    maps::SCRATCH,
    parse::{ptr_at, Packet, PROTO_TCP},
};

const TCP_RST_ACK: u8 = 0x14;

/// Returns `XDP_TX` with the reply in place, or `XDP_DROP` if it could not be built.
/// A BPF subprogram: it returns a scalar.
#[inline(never)]
pub fn reply(ctx: &XdpContext, pkt: &Packet) -> u32 {
    match build(ctx, pkt) {
        Ok(()) => xdp_action::XDP_TX,
        Err(()) => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn build(ctx: &XdpContext, pkt: &Packet) -> Result<(), ()> {
    let seq: *const [u8; 4] = ptr_at(ctx, pkt.l4_off + 4)?;
    // SAFETY: ptr_at checked the bounds.
    let seq = u32::from_be_bytes(unsafe { *seq });
    let payload = pkt.ip_len.saturating_sub(pkt.l4_off - pkt.l3_off + pkt.tcp_hdr_len) as u32;
    let ack = seq.wrapping_add(payload).wrapping_add(u32::from(pkt.tcp_flags & TCP_SYN != 0)).wrapping_add(u32::from(pkt.tcp_flags & TCP_FIN != 0));

    // Back to the sender.
    crate::mem::swap_macs(ctx)?;

    // Assemble IP + TCP in per-CPU scratch memory (keeps this subprogram's frame small):
    // buf[0..40] the IP header (20 used for IPv4), buf[40..60] the TCP header.
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch slot; only `buf` is used here.
    let buf: &mut [u8; 64] = unsafe { &mut (*scratch).buf.0 };
    // SAFETY: the whole 64-byte buffer.
    unsafe { crate::mem::zero::<64>(buf.as_mut_ptr()) };
    {
        let tcp = &mut buf[40..60];
        tcp[0..2].copy_from_slice(&pkt.dport_be);
        tcp[2..4].copy_from_slice(&pkt.sport_be);
        // seq 0: the segment we answer carries no ACK (RFC 9293 3.10.7.1).
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = TCP_RST_ACK;
    }
    let l3 = pkt.l3_off;
    // Pseudo-header: addresses, protocol, TCP length (20).
    let mut acc = 20 + u32::from(PROTO_TCP);
    let new_len = if pkt.is_v6 {
        let ip = &mut buf[..40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&20u16.to_be_bytes());
        ip[6] = PROTO_TCP;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&pkt.dst);
        ip[24..40].copy_from_slice(&pkt.src);
        acc = csum::add(&ip[8..40], acc);
        let c = csum::finish(csum::add(&buf[40..60], acc));
        buf[56..58].copy_from_slice(&c.to_be_bytes());
        copy_out::<40>(ctx, l3, &buf[..40])?;
        copy_out::<20>(ctx, l3 + 40, &buf[40..60])?;
        l3 + 60
    } else {
        let ip = &mut buf[..20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(&pkt.dst[..4]);
        ip[16..20].copy_from_slice(&pkt.src[..4]);
        let c = csum::finish(csum::add(ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        acc = csum::add(&buf[12..20], acc);
        let c = csum::finish(csum::add(&buf[40..60], acc));
        buf[56..58].copy_from_slice(&c.to_be_bytes());
        copy_out::<20>(ctx, l3, &buf[..20])?;
        copy_out::<20>(ctx, l3 + 20, &buf[40..60])?;
        l3 + 40
    };
    let cur = ctx.data_end() - ctx.data();
    // SAFETY: shrinking the frame to the reply; no packet pointer is used afterwards.
    if new_len < cur && unsafe { bpf_xdp_adjust_tail(ctx.ctx, new_len as i32 - cur as i32) } != 0 {
        return Err(());
    }
    Ok(())
}
