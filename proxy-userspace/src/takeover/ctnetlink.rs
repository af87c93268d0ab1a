//! netfilter's conntrack table of this network namespace over ctnetlink: dump it, delete
//! one flow, insert a DNAT flow as `conntrack -I --dst-nat` does.
//!
//! Built on `netlink-packet-netfilter` (rust-netlink) for the messages, tuples, status and
//! TCP protocol info. That crate has no NAT attributes (`CTA_NAT_DST` and its nested
//! `CTA_NAT_V4_MINIP` ... `CTA_PROTONAT_PORT_MAX`), so those are written here by hand as a
//! raw attribute (`DefaultNla`): the kernel parses them from `include/uapi/linux/netfilter/
//! nfnetlink_conntrack.h`'s numbers below.
use std::{io, net::IpAddr};

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol, Status, TCPFlags,
        Tuple,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// `CTA_ZONE` (a flow in a non-default zone is not kube-proxy's).
const CTA_ZONE: u16 = 18;
/// `CTA_NAT_DST`: nested `CTA_NAT_V4_MINIP` (1), `CTA_NAT_V4_MAXIP` (2), `CTA_NAT_PROTO`
/// (3, nested `CTA_PROTONAT_PORT_MIN` (1) / `_MAX` (2)), `CTA_NAT_V6_MINIP` (4),
/// `CTA_NAT_V6_MAXIP` (5).
const CTA_NAT_DST: u16 = 13;
const CTA_NAT_V4_MINIP: u16 = 1;
const CTA_NAT_V4_MAXIP: u16 = 2;
const CTA_NAT_PROTO: u16 = 3;
const CTA_NAT_V6_MINIP: u16 = 4;
const CTA_NAT_V6_MAXIP: u16 = 5;
const CTA_PROTONAT_PORT_MIN: u16 = 1;
const CTA_PROTONAT_PORT_MAX: u16 = 2;

/// `enum tcp_conntrack` (netfilter's TCP states).
pub mod tcp_state {
    pub const SYN_SENT: u8 = 1;
    pub const SYN_RECV: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    pub const FIN_WAIT: u8 = 4;
    pub const CLOSE_WAIT: u8 = 5;
    pub const LAST_ACK: u8 = 6;
    pub const TIME_WAIT: u8 = 7;
    pub const CLOSE: u8 = 8;
}

/// `IP_CT_TCP_FLAG_BE_LIBERAL`: netfilter does not check the window of a flow it did not
/// see open (what it sets itself on a flow picked up mid-stream).
const TCP_FLAG_BE_LIBERAL: u8 = 0x08;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// One direction of a flow as netfilter keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NfTuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// A flow of netfilter's table, as far as takeover needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NfFlow {
    /// As the first packet was: client -> service address.
    pub orig: NfTuple,
    /// As the answers come: backend -> client (or -> the source-NAT address).
    pub reply: NfTuple,
    /// `IPS_*` bits.
    pub status: u32,
    /// TCP only.
    pub tcp_state: Option<u8>,
    pub zone: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum CtnetlinkError {
    #[error("opening a ctnetlink socket: {0} (is nf_conntrack_netlink available?)")]
    Socket(#[source] io::Error),
    #[error("ctnetlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("ctnetlink {op}: undecodable answer: {detail}")]
    Decode { op: &'static str, detail: String },
}

/// A ctnetlink socket of the caller's network namespace.
pub struct Ctnetlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn ip_tuple(t: &NfTuple) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![IPTuple::SourceAddress(t.src), IPTuple::DestinationAddress(t.dst)]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::from(t.proto)),
            ProtoTuple::SourcePort(t.sport),
            ProtoTuple::DestinationPort(t.dport),
        ]),
    ]
}

/// Netlink attribute bytes: header (length, type) and value, padded to 4.
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// `CTA_NAT_DST` translating the destination to `addr:port` (one address, one port).
pub fn nat_dst(addr: IpAddr, port: u16) -> DefaultNla {
    let (min, max, a) = match addr {
        IpAddr::V4(a) => (CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP, a.octets().to_vec()),
        IpAddr::V6(a) => (CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP, a.octets().to_vec()),
    };
    let p = port.to_be_bytes();
    let mut proto = nla(CTA_PROTONAT_PORT_MIN, &p);
    proto.extend(nla(CTA_PROTONAT_PORT_MAX, &p));
    let mut value = nla(min, &a);
    value.extend(nla(max, &a));
    value.extend(nla(CTA_NAT_PROTO, &proto));
    DefaultNla::new(CTA_NAT_DST, value)
}

fn tuple_of(parts: &[Tuple]) -> Option<NfTuple> {
    let (mut src, mut dst, mut sport, mut dport, mut proto) = (None, None, None, None, None);
    for p in parts {
        match p {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for x in ps {
                    match x {
                        ProtoTuple::Protocol(n) => proto = Some(u8::from(*n)),
                        ProtoTuple::SourcePort(n) => sport = Some(*n),
                        ProtoTuple::DestinationPort(n) => dport = Some(*n),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(NfTuple { src: src?, dst: dst?, sport: sport.unwrap_or(0), dport: dport.unwrap_or(0), proto: proto? })
}

/// The flow a dump message describes; `None` for one without both tuples (not a flow).
pub fn flow_of(attrs: &[ConntrackAttribute]) -> Option<NfFlow> {
    let (mut orig, mut reply, mut status, mut tcp_state, mut zone) = (None, None, 0, None, 0);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = tuple_of(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple_of(t),
            ConntrackAttribute::CtaStatus(s) => status = s.bits(),
            ConntrackAttribute::CtaProtoInfo(infos) => {
                for i in infos {
                    if let ProtoInfo::TCP(tcp) = i {
                        for t in tcp {
                            if let ProtoInfoTCP::State(s) = t {
                                tcp_state = Some(*s);
                            }
                        }
                    }
                }
            }
            ConntrackAttribute::Other(nla) if netlink_packet_core::Nla::kind(nla) == CTA_ZONE => {
                let mut v = [0u8; 2];
                netlink_packet_core::Nla::emit_value(nla, &mut v);
                zone = u16::from_be_bytes(v);
            }
            _ => {}
        }
    }
    Some(NfFlow { orig: orig?, reply: reply?, status, tcp_state, zone })
}

/// The attributes of `IPCTNL_MSG_CT_NEW` for a flow `orig` whose destination is translated
/// to `backend` (its replies come from backend -> client), established: what `conntrack -I -s C -d V
/// --sport .. --dport .. --dst-nat B:p --state ESTABLISHED -u ASSURED,SEEN_REPLY -t T` sends.
pub fn dnat_flow_attrs(orig: &NfTuple, backend: (IpAddr, u16), timeout_secs: u32) -> Vec<ConntrackAttribute> {
    flow_attrs(orig, Some(backend), timeout_secs)
}

/// The attributes of an established flow `orig` without NAT (`nat`: `None`), or whose
/// destination is translated to `nat`.
fn flow_attrs(orig: &NfTuple, nat: Option<(IpAddr, u16)>, timeout_secs: u32) -> Vec<ConntrackAttribute> {
    // The reply tuple as it would be without NAT (the inverse of `orig`): the kernel sets
    // the NAT up by altering it to backend -> client, and marks the flow as DNATed only if
    // it did change. Given as backend -> client, it would be a plain flow that never
    // translates a packet.
    let reply = NfTuple { src: orig.dst, dst: orig.src, sport: orig.dport, dport: orig.sport, proto: orig.proto };
    // CONFIRMED too: the kernel sets it on the new entry before applying the status asked
    // for, and refuses (EBUSY) a status that would clear it.
    let status = Status::Confirmed | Status::Assured | Status::SeenReply;
    let mut attrs = vec![
        ConntrackAttribute::CtaTupleOrig(ip_tuple(orig)),
        ConntrackAttribute::CtaTupleReply(ip_tuple(&reply)),
        ConntrackAttribute::CtaStatus(status),
        ConntrackAttribute::CtaTimeout(timeout_secs),
    ];
    if let Some((addr, port)) = nat {
        attrs.push(ConntrackAttribute::Other(nat_dst(addr, port)));
    }
    if orig.proto == IPPROTO_TCP {
        // `TCPFlags` is non-exhaustive: built by parsing its two bytes (flags, mask).
        let liberal = || TCPFlags::parse(&[TCP_FLAG_BE_LIBERAL, TCP_FLAG_BE_LIBERAL]);
        let mut tcp = vec![ProtoInfoTCP::State(tcp_state::ESTABLISHED)];
        if let (Ok(o), Ok(r)) = (liberal(), liberal()) {
            tcp.extend([ProtoInfoTCP::OriginalFlags(o), ProtoInfoTCP::ReplyFlags(r)]);
        }
        attrs.push(ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(tcp)]));
    }
    attrs
}

fn family_of(addr: IpAddr) -> NetfilterProtoFamily {
    match addr {
        IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
        IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
    }
}

impl Ctnetlink {
    pub fn open() -> Result<Self, CtnetlinkError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(CtnetlinkError::Socket)?;
        socket.bind_auto().map_err(CtnetlinkError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(CtnetlinkError::Socket)?;
        Ok(Ctnetlink { socket, seq: 0, buf: vec![0; 1 << 16] })
    }

    fn send(&mut self, family: NetfilterProtoFamily, msg: ConntrackMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), msg)),
        );
        packet.finalize();
        let mut bytes = vec![0; packet.header.length as usize];
        packet.serialize(&mut bytes[..]);
        self.socket.send(&bytes, 0)?;
        Ok(self.seq)
    }

    /// Read answers to request `seq` until its ACK/error (`dump`: until `Done`), handing
    /// each conntrack message to `each`.
    fn receive(
        &mut self,
        op: &'static str,
        seq: u32,
        mut each: impl FnMut(&[ConntrackAttribute]),
    ) -> Result<(), CtnetlinkError> {
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0).map_err(|source| CtnetlinkError::Io { op, source })?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&self.buf[off..n])
                    .map_err(|e| CtnetlinkError::Decode { op, detail: e.to_string() })?;
                let len = msg.header.length as usize;
                let mine = msg.header.sequence_number == seq;
                match msg.payload {
                    NetlinkPayload::Done(_) if mine => return Ok(()),
                    NetlinkPayload::Error(e) if mine => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(CtnetlinkError::Io { op, source: e.to_io() }),
                        };
                    }
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner:
                            NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs) | ConntrackMessage::Get(attrs)),
                        ..
                    }) if mine => each(&attrs),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len.next_multiple_of(4);
            }
        }
    }

    /// The flows of the table (both families) that `keep` wants, and how many were read: a
    /// busy node's table can hold a million flows, of which few are kept.
    pub fn dump_where(&mut self, keep: impl Fn(&NfFlow) -> bool) -> Result<(Vec<NfFlow>, usize), CtnetlinkError> {
        let seq = self
            .send(NetfilterProtoFamily::Unspec, ConntrackMessage::Get(vec![]), NLM_F_REQUEST | NLM_F_DUMP)
            .map_err(|source| CtnetlinkError::Io { op: "dump", source })?;
        let (mut flows, mut read) = (Vec::new(), 0);
        self.receive("dump", seq, |attrs| {
            read += 1;
            flows.extend(flow_of(attrs).filter(&keep));
        })?;
        Ok((flows, read))
    }

    /// Delete the flow that has `tuple` as either direction. `Ok(false)`: there was none.
    pub fn delete(&mut self, tuple: &NfTuple) -> Result<bool, CtnetlinkError> {
        let msg = ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(ip_tuple(tuple))]);
        let seq = self
            .send(family_of(tuple.src), msg, NLM_F_REQUEST | NLM_F_ACK)
            .map_err(|source| CtnetlinkError::Io { op: "delete", source })?;
        match self.receive("delete", seq, |_| {}) {
            Ok(()) => Ok(true),
            Err(CtnetlinkError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Insert a flow whose destination is translated (see [`dnat_flow_attrs`]). `Ok(false)`:
    /// a flow holding one of its tuples is there (`EEXIST`).
    pub fn create_dnat(
        &mut self,
        orig: &NfTuple,
        backend: (IpAddr, u16),
        timeout_secs: u32,
    ) -> Result<bool, CtnetlinkError> {
        self.create(flow_attrs(orig, Some(backend), timeout_secs), orig)
    }

    /// Insert an established flow `orig` without NAT (what netfilter would track for
    /// packets we translated). `Ok(false)`: `EEXIST`.
    pub fn create_plain(&mut self, orig: &NfTuple, timeout_secs: u32) -> Result<bool, CtnetlinkError> {
        self.create(flow_attrs(orig, None, timeout_secs), orig)
    }

    fn create(&mut self, attrs: Vec<ConntrackAttribute>, orig: &NfTuple) -> Result<bool, CtnetlinkError> {
        let msg = ConntrackMessage::New(attrs);
        let seq = self
            .send(family_of(orig.src), msg, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
            .map_err(|source| CtnetlinkError::Io { op: "create", source })?;
        match self.receive("create", seq, |_| {}) {
            Ok(()) => Ok(true),
            Err(CtnetlinkError::Io { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use netlink_packet_core::{Emitable, Nla};

    use super::*;

    #[test]
    fn the_nat_attribute_is_what_the_kernel_parses() {
        let a = nat_dst(IpAddr::V4(Ipv4Addr::new(10, 244, 0, 11)), 8080);
        assert_eq!(a.kind(), CTA_NAT_DST);
        let mut v = vec![0; a.value_len()];
        a.emit_value(&mut v);
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[8, 0, 1, 0, 10, 244, 0, 11][..],   // CTA_NAT_V4_MINIP
            &[8, 0, 2, 0, 10, 244, 0, 11],       // CTA_NAT_V4_MAXIP
            &[20, 0, 3, 0,                       // CTA_NAT_PROTO
              6, 0, 1, 0, 0x1f, 0x90, 0, 0,      //   CTA_PROTONAT_PORT_MIN (big-endian, padded)
              6, 0, 2, 0, 0x1f, 0x90, 0, 0],     //   CTA_PROTONAT_PORT_MAX
        ].concat();
        assert_eq!(v, want);
    }

    #[test]
    fn a_flow_reads_back_from_the_attributes_it_is_written_with() {
        let orig = NfTuple {
            src: "10.244.0.10".parse().unwrap(),
            dst: "10.96.0.10".parse().unwrap(),
            sport: 40000,
            dport: 80,
            proto: IPPROTO_TCP,
        };
        let attrs = dnat_flow_attrs(&orig, ("10.244.0.11".parse().unwrap(), 8080), 60);
        let mut bytes = vec![0; attrs.as_slice().buffer_len()];
        attrs.as_slice().emit(&mut bytes);
        let f = flow_of(&attrs).unwrap();
        assert_eq!(f.orig, orig);
        // The reply tuple before NAT (the kernel alters it to the backend's).
        assert_eq!((f.reply.src, f.reply.sport, f.reply.dst, f.reply.dport), (orig.dst, 80, orig.src, 40000));
        assert_eq!(f.tcp_state, Some(tcp_state::ESTABLISHED));
    }
}
