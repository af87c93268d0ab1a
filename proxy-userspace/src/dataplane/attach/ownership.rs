//! Which programs attached to the interfaces of the caller's network namespace are ours,
//! whoever attached them (this agent, an agent on another `--bpffs-root`, a crashed one),
//! and detaching them.
//!
//! Ours = a program whose name is one of the object's four programs and that uses a map
//! named `CONNTRACK`, `CT_NEW` or `SERVICES` (or their IPv6 twins): the name alone could be
//! another tool's `from_pod`. The
//! kernel truncates names to 15 bytes; ours are shorter.
//!
//! Everything is asked of the kernel per interface of this namespace (tcx: `BPF_PROG_QUERY`
//! on the ifindex, which the kernel resolves in the caller's namespace; XDP: the program id
//! rtnetlink reports for the device; clsact filters (kernels without tcx): the program id
//! rtnetlink lists for each `bpf` filter), so interfaces of other namespaces that happen to
//! have the same ifindex are never touched. Filters of other tools on the same device
//! (another program, a `u32` or `matchall` filter, classic BPF) are never ours.
//!
//! Recognising a program by id (`BPF_PROG_GET_FD_BY_ID`, `BPF_MAP_GET_FD_BY_ID`) needs
//! CAP_SYS_ADMIN; without it nothing is recognised ([`can_inspect`] tells), and only our own
//! program ids, which the agent knows, can be checked.
use std::{collections::HashMap, fmt};

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkMessage, LinkXdp};
use rtnetlink::LinkUnspec;

use crate::dataplane::{
    DataplaneError,
    attach::clsact::{self, ClsactSide, FilterAddr},
    kernel::bpfsys::{self, BPF_LINK_TYPE_XDP, BPF_TCX_EGRESS, BPF_TCX_INGRESS},
    maps::loader::NET_PROGRAMS,
};

/// Maps only our object defines under these names.
const OUR_MAPS: [&str; 7] = [
    proxy_common::map_names::NODE_CONFIG,
    proxy_common::map_names::CONNTRACK,
    proxy_common::map_names::SERVICES,
    proxy_common::map_names::CONNTRACK6,
    proxy_common::map_names::SERVICES6,
    proxy_common::map_names::CT_NEW,
    proxy_common::map_names::CT_NEW6,
];

/// Maps the socket-level programs use that only our object defines under these names (the
/// reverse hooks use nothing but `SOCK_REVNAT`/`SOCK_REVNAT6`).
const OUR_SOCK_MAPS: [&str; 5] = [
    proxy_common::map_names::SERVICES,
    proxy_common::map_names::SERVICES6,
    proxy_common::map_names::SOCK_REVNAT,
    proxy_common::map_names::SOCK_REVNAT6,
    proxy_common::map_names::SOCK_CONFIG,
];

/// The name of program `prog_id` if it is named like one of `names` and uses a map named
/// like one of `maps`: the name alone could be another tool's.
fn recognise(prog_id: u32, names: &[&str], maps: &[&str]) -> Option<String> {
    let info = bpfsys::prog_info(prog_id).ok()?;
    if !names.contains(&info.name.as_str()) {
        return None;
    }
    let uses_our_maps = info.map_ids.iter().any(|id| {
        aya::maps::MapInfo::from_id(*id).ok().is_some_and(|m| m.name_as_str().is_some_and(|n| maps.contains(&n)))
    });
    uses_our_maps.then_some(info.name)
}

/// The name of program `prog_id` if it is one of our socket-level (cgroup) programs,
/// whichever agent loaded it.
pub fn sock_program_ours(prog_id: u32) -> Option<String> {
    recognise(prog_id, &crate::dataplane::maps::loader::SOCK_PROGRAMS, &OUR_SOCK_MAPS)
}

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    TcxIngress,
    TcxEgress,
    Xdp,
    /// A filter on the clsact qdisc (kernels without tcx).
    ClsactIngress,
    ClsactEgress,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::TcxIngress => "tcx ingress",
            Hook::TcxEgress => "tcx egress",
            Hook::Xdp => "xdp",
            Hook::ClsactIngress => "clsact ingress",
            Hook::ClsactEgress => "clsact egress",
        })
    }
}

/// One of our programs attached to an interface of this namespace.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub iface: String,
    pub ifindex: u32,
    pub hook: Hook,
    pub program: String,
    pub prog_id: u32,
    /// None for an attachment without a bpf_link (XDP over netlink, clsact filters).
    pub link_id: Option<u32>,
    /// Where a clsact filter sits (None for tcx and XDP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterAddr>,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({}, prog id {}", self.iface, self.hook, self.program, self.prog_id)?;
        match (self.link_id, self.filter) {
            (Some(l), _) => write!(f, ", link id {l})"),
            (None, Some(addr)) => write!(f, ", filter {addr})"),
            (None, None) => write!(f, ", no link)"),
        }
    }
}

/// An interface of this namespace, with the XDP program id the kernel reports for it.
#[derive(Clone, Debug)]
pub struct Iface {
    pub index: u32,
    pub name: String,
    pub xdp_prog: Option<u32>,
}

fn netlink_err(e: impl fmt::Display) -> DataplaneError {
    DataplaneError::Attach { iface: String::new(), message: format!("rtnetlink: {e}") }
}

fn iface_of(msg: &LinkMessage) -> Iface {
    let mut out = Iface { index: msg.header.index, name: String::new(), xdp_prog: None };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => out.name = n.clone(),
            LinkAttribute::Xdp(x) => {
                out.xdp_prog = x.iter().find_map(|x| match x {
                    LinkXdp::ProgId(id) if *id != 0 => Some(*id),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    out
}

/// Every interface of the caller's network namespace (rtnetlink dump).
pub async fn interfaces() -> Result<Vec<Iface>, DataplaneError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(netlink_err)?;
    let task = tokio::spawn(conn);
    let mut stream = handle.link().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = stream.try_next().await.map_err(netlink_err)? {
        out.push(iface_of(&msg));
    }
    task.abort();
    Ok(out)
}

/// One interface by index, if it exists.
pub async fn interface(index: u32) -> Result<Option<Iface>, DataplaneError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(netlink_err)?;
    let task = tokio::spawn(conn);
    let mut stream = handle.link().get().match_index(index).execute();
    // A vanished interface is an error reply (ENODEV), not an empty answer.
    let found = stream.try_next().await.ok().flatten().map(|m| iface_of(&m));
    task.abort();
    Ok(found)
}

/// Whether this process may inspect programs by id (`BPF_PROG_GET_FD_BY_ID` needs
/// CAP_SYS_ADMIN; the agent's DaemonSet does not grant it). Without it, attachments of
/// other agents cannot be recognised, only our own pins.
pub fn can_inspect(our_prog_id: u32) -> bool {
    Recognizer::default().ours(our_prog_id).is_some()
}

/// Recognises our programs by id, remembering the answers (program ids are never reused
/// while the program lives).
#[derive(Default)]
pub struct Recognizer {
    known: HashMap<u32, Option<String>>,
}

impl Recognizer {
    /// The program's name if it is one of ours.
    pub fn ours(&mut self, prog_id: u32) -> Option<String> {
        self.known.entry(prog_id).or_insert_with(|| recognise(prog_id, &NET_PROGRAMS, &OUR_MAPS)).clone()
    }

    /// Our programs attached to `iface` (tcx both directions, and XDP).
    pub fn attachments_on(&mut self, iface: &Iface) -> Vec<Attachment> {
        let mut out = Vec::new();
        for (hook, at) in [(Hook::TcxIngress, BPF_TCX_INGRESS), (Hook::TcxEgress, BPF_TCX_EGRESS)] {
            for (prog_id, link_id) in bpfsys::tcx_query(iface.index, at).unwrap_or_default() {
                if let Some(program) = self.ours(prog_id) {
                    out.push(Attachment {
                        iface: iface.name.clone(),
                        ifindex: iface.index,
                        hook,
                        program,
                        prog_id,
                        link_id: (link_id != 0).then_some(link_id),
                        filter: None,
                    });
                }
            }
        }
        if let Some(prog_id) = iface.xdp_prog
            && let Some(program) = self.ours(prog_id)
        {
            out.push(Attachment {
                iface: iface.name.clone(),
                ifindex: iface.index,
                hook: Hook::Xdp,
                program,
                prog_id,
                link_id: xdp_link_of(iface.index, prog_id),
                filter: None,
            });
        }
        out
    }

    /// Our programs in clsact filters on `iface` (both sides): `bpf` filters whose program
    /// is ours, whoever attached them. Other filters on the device are not listed.
    pub async fn clsact_on(&mut self, iface: &Iface) -> Result<Vec<Attachment>, DataplaneError> {
        Ok(clsact::list(iface.index)
            .await?
            .into_iter()
            .filter_map(|f| {
                let prog_id = f.prog_id?;
                let program = self.ours(prog_id)?;
                let hook = match f.addr.side {
                    ClsactSide::Ingress => Hook::ClsactIngress,
                    ClsactSide::Egress => Hook::ClsactEgress,
                };
                Some(Attachment {
                    iface: iface.name.clone(),
                    ifindex: iface.index,
                    hook,
                    program,
                    prog_id,
                    link_id: None,
                    filter: Some(f.addr),
                })
            })
            .collect())
    }
}

/// The XDP link running `prog_id` on `ifindex`. Program ids are global and each of our
/// XDP programs is attached once, so the pair identifies the link.
fn xdp_link_of(ifindex: u32, prog_id: u32) -> Option<u32> {
    bpfsys::link_ids().into_iter().find(|id| {
        bpfsys::link_fd_by_id(*id)
            .and_then(|fd| bpfsys::link_info(&fd))
            .is_ok_and(|i| i.link_type == BPF_LINK_TYPE_XDP && i.prog_id == prog_id && i.ifindex == ifindex)
    })
}

/// Our programs attached anywhere in this namespace: tcx, XDP and clsact filters.
pub async fn scan() -> Result<Vec<Attachment>, DataplaneError> {
    let mut r = Recognizer::default();
    let mut out = Vec::new();
    for i in interfaces().await? {
        out.extend(r.attachments_on(&i));
        out.extend(r.clsact_on(&i).await?);
    }
    Ok(out)
}

/// Detach one attachment: `BPF_LINK_DETACH` on its link (pins of it, anywhere, become
/// defunct), or, for XDP attached over netlink, an XDP fd of -1.
pub async fn detach(a: &Attachment) -> Result<(), DataplaneError> {
    let err = |what: &str, e: &dyn fmt::Display| DataplaneError::Attach {
        iface: a.iface.clone(),
        message: format!("detaching {} ({}): {what}: {e}", a.program, a.hook),
    };
    match (a.link_id, a.filter) {
        // Exactly this filter (its own handle): other filters on the device stay.
        (None, Some(addr)) => {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(netlink_err)?;
            let task = tokio::spawn(conn);
            let r = clsact::delete(&handle, a.ifindex, &addr).await.map_err(|e| err("netlink filter delete", &e));
            task.abort();
            r
        }
        (Some(id), _) => {
            let fd = bpfsys::link_fd_by_id(id).map_err(|e| err("link by id", &e))?;
            bpfsys::link_detach(&fd).map_err(|e| err("BPF_LINK_DETACH", &e))
        }
        (None, None) if a.hook == Hook::Xdp => {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(netlink_err)?;
            let task = tokio::spawn(conn);
            let msg = LinkUnspec::new_with_index(a.ifindex)
                .append_extra_attribute(LinkAttribute::Xdp(vec![LinkXdp::Fd(-1)]))
                .build();
            let r = handle.link().set(msg).execute().await.map_err(|e| err("netlink XDP detach", &e));
            task.abort();
            r
        }
        // tcx programs attached without a link (BPF_PROG_ATTACH): not something we do.
        (None, None) => Err(err("no link", &"attached without a bpf_link; not ours to detach")),
    }
}
