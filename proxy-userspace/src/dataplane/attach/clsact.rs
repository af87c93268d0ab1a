//! Legacy clsact filters (kernels without tcx, < 6.6, or `--tc-attach clsact`): listing the
//! filters of a device, deleting exactly one, and removing the clsact qdisc once nothing is
//! left in it. All over rtnetlink (no `tc` binary).
//!
//! A filter is addressed by (device, parent, priority, protocol, handle): the kernel deletes
//! the whole priority (every filter in it) when the handle is 0, so a filter is only ever
//! deleted with its own non-zero handle, as listed. Which filters are ours is decided by the
//! caller (`ownership`) from the program id the kernel reports for a `bpf` filter.
use std::fmt;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};

use crate::dataplane::DataplaneError;

/// `TCA_KIND` of a cls_bpf filter.
const KIND_BPF: &str = "bpf";
/// `TCA_KIND` of the clsact qdisc.
const KIND_CLSACT: &str = "clsact";

/// Which side of the clsact qdisc a filter hangs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClsactSide {
    Ingress,
    Egress,
}

impl ClsactSide {
    pub const BOTH: [ClsactSide; 2] = [ClsactSide::Ingress, ClsactSide::Egress];

    /// The filter parent (`ffff:fff2` ingress, `ffff:fff3` egress).
    fn parent(self) -> TcHandle {
        let minor = match self {
            ClsactSide::Ingress => TcHandle::MIN_INGRESS,
            ClsactSide::Egress => TcHandle::MIN_EGRESS,
        };
        TcHandle { major: TcHandle::CLSACT.major, minor }
    }
}

impl fmt::Display for ClsactSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClsactSide::Ingress => "ingress",
            ClsactSide::Egress => "egress",
        })
    }
}

/// Where one filter sits: enough to delete exactly it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FilterAddr {
    pub side: ClsactSide,
    /// `pref` in `tc filter show`.
    pub priority: u16,
    /// `tcm_info`'s low half: the protocol in network byte order, as the kernel reports it.
    pub protocol: u16,
    pub handle: u32,
    /// Chain index, when the kernel reported one (0 is the default chain).
    pub chain: Option<u32>,
}

impl fmt::Display for FilterAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pref {} handle {:#x}", self.priority, self.handle)
    }
}

/// One filter of a device's clsact qdisc, as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub addr: FilterAddr,
    /// `bpf`, `u32`, `matchall`, ...
    pub kind: String,
    /// For a `bpf` filter running an eBPF program (classic BPF bytecode has none).
    pub prog_id: Option<u32>,
    /// The name given at attach time (`TCA_BPF_NAME`).
    pub prog_name: Option<String>,
}

fn netlink_err(ifindex: u32, what: &str, e: impl fmt::Display) -> DataplaneError {
    DataplaneError::Attach { iface: format!("ifindex {ifindex}"), message: format!("{what}: {e}") }
}

fn filter_of(msg: &TcMessage, side: ClsactSide) -> Option<Filter> {
    // The kernel lists each priority's head (handle 0) before its filters: not a filter.
    let handle = u32::from(msg.header.handle);
    if handle == 0 {
        return None;
    }
    let mut f = Filter {
        addr: FilterAddr {
            side,
            priority: (msg.header.info >> 16) as u16,
            protocol: (msg.header.info & 0xffff) as u16,
            handle,
            chain: None,
        },
        kind: String::new(),
        prog_id: None,
        prog_name: None,
    };
    for a in &msg.attributes {
        match a {
            TcAttribute::Kind(k) => f.kind = k.clone(),
            TcAttribute::Chain(c) => f.addr.chain = Some(*c),
            TcAttribute::Options(opts) => {
                for o in opts {
                    match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => f.prog_id = Some(*id),
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => f.prog_name = Some(n.clone()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(f)
}

/// Every message the kernel lists on `side` of the device's clsact qdisc: filters, and the
/// heads of their priorities. Empty when the device has no clsact qdisc.
async fn dump(handle: &rtnetlink::Handle, ifindex: u32, side: ClsactSide) -> Result<Vec<TcMessage>, DataplaneError> {
    let req = handle.clone().traffic_filter(ifindex as i32).get();
    let req = match side {
        ClsactSide::Ingress => req.ingress(),
        ClsactSide::Egress => req.egress(),
    };
    match req.execute().try_collect().await {
        Ok(v) => Ok(v),
        // A device without a clsact qdisc (or gone meanwhile): nothing there.
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(-e.raw_code(), libc::EINVAL | libc::ENOENT | libc::ENODEV) =>
        {
            Ok(Vec::new())
        }
        Err(e) => Err(netlink_err(ifindex, "listing clsact filters", e)),
    }
}

/// The filters on both sides of the device's clsact qdisc.
pub async fn filters(handle: &rtnetlink::Handle, ifindex: u32) -> Result<Vec<Filter>, DataplaneError> {
    let mut out = Vec::new();
    for side in ClsactSide::BOTH {
        out.extend(dump(handle, ifindex, side).await?.iter().filter_map(|m| filter_of(m, side)));
    }
    Ok(out)
}

/// [`filters`] over a connection of its own.
pub async fn list(ifindex: u32) -> Result<Vec<Filter>, DataplaneError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| netlink_err(ifindex, "rtnetlink", e))?;
    let task = tokio::spawn(conn);
    let r = filters(&handle, ifindex).await;
    task.abort();
    r
}

/// Send one request that expects only an acknowledgement.
async fn ack(handle: &rtnetlink::Handle, msg: RouteNetlinkMessage) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut resp = handle.clone().request(req)?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(e) = m.payload
            && e.code.is_some()
        {
            return Err(rtnetlink::Error::NetlinkError(e));
        }
    }
    Ok(())
}

/// Delete exactly the filter at `addr` (its kind, priority, protocol and non-zero handle).
pub async fn delete(handle: &rtnetlink::Handle, ifindex: u32, addr: &FilterAddr) -> Result<(), DataplaneError> {
    if addr.handle == 0 {
        // Handle 0 would delete every filter of that priority, others' included.
        return Err(netlink_err(ifindex, "deleting a clsact filter", "refusing handle 0 (the whole priority)"));
    }
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = addr.side.parent();
    msg.header.handle = addr.handle.into();
    msg.header.info = (u32::from(addr.priority) << 16) | u32::from(addr.protocol);
    msg.attributes.push(TcAttribute::Kind(KIND_BPF.into()));
    if let Some(c) = addr.chain {
        msg.attributes.push(TcAttribute::Chain(c));
    }
    ack(handle, RouteNetlinkMessage::DelTrafficFilter(msg))
        .await
        .map_err(|e| netlink_err(ifindex, &format!("deleting clsact {} filter {addr}", addr.side), e))
}

/// Remove the device's clsact qdisc if no filter at all is left on either side (ours are
/// gone by then; anything else, another tool's, keeps it). `Ok(true)` when removed.
pub async fn remove_qdisc_if_empty(handle: &rtnetlink::Handle, ifindex: u32) -> Result<bool, DataplaneError> {
    for side in ClsactSide::BOTH {
        if !dump(handle, ifindex, side).await?.is_empty() {
            return Ok(false);
        }
    }
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = TcHandle::CLSACT;
    msg.header.handle = TcHandle { major: TcHandle::CLSACT.major, minor: 0 };
    msg.attributes.push(TcAttribute::Kind(KIND_CLSACT.into()));
    match ack(handle, RouteNetlinkMessage::DelQueueDiscipline(msg)).await {
        Ok(()) => Ok(true),
        // Already gone (a second cleanup, or another tool removed it meanwhile).
        Err(rtnetlink::Error::NetlinkError(e)) if matches!(-e.raw_code(), libc::ENOENT | libc::EINVAL) => Ok(false),
        Err(e) => Err(netlink_err(ifindex, "removing the clsact qdisc", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clsact_parents_are_tcs() {
        // `tc filter ... ingress` is ffff:fff2, `egress` ffff:fff3.
        assert_eq!(u32::from(ClsactSide::Ingress.parent()), 0xffff_fff2);
        assert_eq!(u32::from(ClsactSide::Egress.parent()), 0xffff_fff3);
        assert_eq!(u32::from(TcHandle::CLSACT), 0xffff_fff1);
    }

    #[test]
    fn priority_heads_are_not_filters() {
        let mut head = TcMessage::with_index(3);
        head.header.info = (49152 << 16) | 0x0300;
        head.attributes.push(TcAttribute::Kind("bpf".into()));
        assert_eq!(filter_of(&head, ClsactSide::Ingress), None);
        let mut f = head.clone();
        f.header.handle = 1.into();
        f.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgName("from_pod".into())),
            TcOption::Bpf(TcFilterBpfOption::ProgId(42)),
        ]));
        let got = filter_of(&f, ClsactSide::Egress).unwrap();
        assert_eq!(
            got.addr,
            FilterAddr { side: ClsactSide::Egress, priority: 49152, protocol: 0x0300, handle: 1, chain: None }
        );
        assert_eq!((got.kind.as_str(), got.prog_id, got.prog_name.as_deref()), ("bpf", Some(42), Some("from_pod")));
    }
}
