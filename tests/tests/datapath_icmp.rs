//! ICMP and ICMPv6 errors about translated flows through BPF_PROG_TEST_RUN (issue 12), as
//! one table run for both families: each row names the message (its meaning, with the
//! type and code of each family), who sends it, which flow its quote is about, and what
//! must come out. A translated error has its outer header and its quoted packet translated
//! the way the flow's own packets are, with every checksum recomputed independently here
//! (`frames::icmp_message_view`: the outer IPv4 header, ICMP (ICMPv6 over its
//! pseudo-header), the quoted IPv4 header, the quoted TCP/UDP when the quote is whole).
//! Messages that are not errors, and errors about flows nobody translated, pass untouched.
use std::{
    cell::RefCell,
    net::IpAddr,
    sync::atomic::{AtomicU16, Ordering},
};

use proxy_common::verdict;
use proxy_tests::{
    family::*,
    frames::{icmp_message_any, icmp_message_view},
    harness::*,
};
use proxy_userspace::model::{FrontendKind, Protocol, Scope};

/// A message type by meaning: its (type, code) in ICMP and in ICMPv6.
#[derive(Clone, Copy, Debug)]
struct Msg {
    v4: (u8, u8),
    v6: (u8, u8),
}

impl Msg {
    fn of(self, fam: Family) -> (u8, u8) {
        if fam == Family::V4 { self.v4 } else { self.v6 }
    }

    /// The 4 bytes after the checksum: the next-hop MTU for "too big" (16 bits in ICMP,
    /// 32 in ICMPv6), zero (unused, or a pointer of 0) for the others.
    fn rest(self, fam: Family) -> [u8; 4] {
        match (fam, self.of(fam)) {
            (Family::V4, (3, 4)) => [0, 0, (MTU >> 8) as u8, MTU as u8],
            (Family::V6, (2, 0)) => u32::from(MTU).to_be_bytes(),
            _ => [0; 4],
        }
    }
}

const MTU: u16 = 1280;

const NET_UNREACHABLE: Msg = Msg { v4: (3, 0), v6: (1, 0) };
const HOST_UNREACHABLE: Msg = Msg { v4: (3, 1), v6: (1, 3) };
const PORT_UNREACHABLE: Msg = Msg { v4: (3, 3), v6: (1, 4) };
const TOO_BIG: Msg = Msg { v4: (3, 4), v6: (2, 0) };
const ADMIN_PROHIBITED: Msg = Msg { v4: (3, 13), v6: (1, 1) };
const TTL_EXCEEDED: Msg = Msg { v4: (11, 0), v6: (3, 0) };
const REASSEMBLY_EXCEEDED: Msg = Msg { v4: (11, 1), v6: (3, 1) };
const PARAMETER_PROBLEM: Msg = Msg { v4: (12, 0), v6: (4, 0) };
const ECHO_REQUEST: Msg = Msg { v4: (8, 0), v6: (128, 0) };
const ECHO_REPLY: Msg = Msg { v4: (0, 0), v6: (129, 0) };
/// Informational types of one family only: a timestamp request, a neighbour solicitation.
const TIMESTAMP_OR_NEIGHBOUR_SOLICITATION: Msg = Msg { v4: (14, 0), v6: (135, 0) };

/// Who a row's addresses are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Client,
    Vip,
    Backend,
    /// A router on the way (no Service address).
    Router,
}

/// What the message's body quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum About {
    /// The client's packet as it left `from_pod` (DNATed to the backend); the message goes
    /// back into the client pod (`to_pod`).
    ClientPacket,
    /// The same, cut to the 8 bytes of the transport header RFC 792 promises.
    ClientPacketShort,
    /// The backend's reply as the client received it (source put back to the VIP); the
    /// client's message leaves its pod (`from_pod`).
    Reply,
    /// A packet of a flow no Service translated (client straight to the backend's address).
    Untracked,
    /// No quote: an echo request from the client to the VIP.
    Nothing,
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Translated: the outer (source, destination) and the quote's source and destination,
    /// counted under `icmp_error`.
    Translated { outer: (Who, Who), quote_src: Who, quote_dst: Who },
    /// The frame comes out byte for byte, from both TC programs, counted under `other_l4`.
    Untouched,
    /// The frame comes out byte for byte from `to_pod` (nothing counted is asserted).
    Passes,
}

#[derive(Clone, Copy, Debug)]
struct Row {
    name: &'static str,
    proto: Protocol,
    msg: Msg,
    from: Who,
    about: About,
    expect: Expect,
}

/// The error scenarios the IPv4 and IPv6 files held, one row each, plus every error type.
fn rows() -> Vec<Row> {
    use About::*;
    use Expect::*;
    use Who::*;
    let back_to_client = Translated { outer: (Router, Client), quote_src: Client, quote_dst: Vip };
    let mut rows = vec![
        Row {
            name: "too big from a router about a client segment quotes the VIP",
            proto: Protocol::Tcp,
            msg: TOO_BIG,
            from: Router,
            about: ClientPacket,
            expect: back_to_client,
        },
        Row {
            name: "a short quote (8 bytes of TCP) is translated too",
            proto: Protocol::Tcp,
            msg: TTL_EXCEEDED,
            from: Router,
            about: ClientPacketShort,
            expect: back_to_client,
        },
        Row {
            name: "port unreachable from the backend comes from the VIP",
            proto: Protocol::Udp,
            msg: PORT_UNREACHABLE,
            from: Backend,
            about: ClientPacket,
            expect: Translated { outer: (Vip, Client), quote_src: Client, quote_dst: Vip },
        },
        Row {
            name: "the client's error about a reply goes to the backend",
            proto: Protocol::Udp,
            msg: PORT_UNREACHABLE,
            from: Client,
            about: Reply,
            expect: Translated { outer: (Client, Backend), quote_src: Backend, quote_dst: Client },
        },
        Row {
            name: "an error about an untracked flow passes untouched",
            proto: Protocol::Tcp,
            msg: HOST_UNREACHABLE,
            from: Router,
            about: Untracked,
            expect: Untouched,
        },
        Row {
            name: "an echo request passes untouched",
            proto: Protocol::Tcp,
            msg: ECHO_REQUEST,
            from: Client,
            about: Nothing,
            expect: Untouched,
        },
    ];
    let every_error = [
        ("net unreachable", NET_UNREACHABLE),
        ("host unreachable", HOST_UNREACHABLE),
        ("port unreachable", PORT_UNREACHABLE),
        ("too big", TOO_BIG),
        ("administratively prohibited", ADMIN_PROHIBITED),
        ("TTL exceeded", TTL_EXCEEDED),
        ("reassembly time exceeded", REASSEMBLY_EXCEEDED),
        ("parameter problem", PARAMETER_PROBLEM),
    ];
    for (name, msg) in every_error {
        rows.push(Row { name, proto: Protocol::Tcp, msg, from: Router, about: ClientPacket, expect: back_to_client });
    }
    for (name, msg) in
        [("echo reply", ECHO_REPLY), ("timestamp / neighbour solicitation", TIMESTAMP_OR_NEIGHBOUR_SOLICITATION)]
    {
        rows.push(Row { name, proto: Protocol::Tcp, msg, from: Router, about: ClientPacket, expect: Passes });
    }
    rows
}

/// The service port of a row's protocol: TCP VIP:80 -> b1:8080, UDP VIP:53 -> b1:5353.
fn ports(proto: Protocol) -> (u16, u16) {
    if proto == Protocol::Tcp { (80, 8080) } else { (53, 5353) }
}

fn seed(fam: Family) -> TestDataplane {
    let a = fam.addrs();
    let mut dp = TestDataplane::load();
    let entries = [Protocol::Tcp, Protocol::Udp]
        .map(|proto| {
            let (port, target) = ports(proto);
            (fk(a.vip, port, proto, Scope::Internal), svc(FrontendKind::ClusterIP, &[(a.b1, target, true)]))
        })
        .to_vec();
    dp.program(entries);
    dp
}

fn router(fam: Family) -> IpAddr {
    fam.pick("169.254.1.1", "fd00:10:244::1")
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn icmp_errors_about_translated_flows() {
    require_root("icmp_errors_about_translated_flows");
    let dps = [RefCell::new(seed(Family::V4)), RefCell::new(seed(Family::V6))];
    let next_port = AtomicU16::new(40000);
    let cases =
        Family::ALL.iter().flat_map(|f| rows().into_iter().map(move |r| (format!("{} {}", f.name(), r.name), (*f, r))));
    run_cases(cases, |(fam, row)| {
        let a = fam.addrs();
        let mut dp = dps[fam as usize].borrow_mut();
        let (port, target) = ports(row.proto);
        let client = (a.client, next_port.fetch_add(1, Ordering::Relaxed));
        let who = |w: Who| match w {
            Who::Client => a.client,
            Who::Vip => a.vip,
            Who::Backend => a.b1,
            Who::Router => router(fam),
        };
        let with_port = |w: Who| match w {
            Who::Client => client,
            Who::Vip => (a.vip, port),
            Who::Backend => (a.b1, target),
            Who::Router => (router(fam), 0),
        };
        let ip = ETH_HLEN;

        // The flow the message is about, and the program that sees the message.
        let (body, prog) = match row.about {
            About::Nothing => (b"ping payload".to_vec(), FROM_POD),
            About::Untracked => (fam.segment(client, (a.b1, target), tcp::ACK, b"x")[ip..].to_vec(), TO_POD),
            about => {
                let first = match row.proto {
                    Protocol::Tcp => fam.segment(client, (a.vip, port), tcp::ACK, &[7u8; 600]),
                    _ => fam.udp(client, (a.vip, port), b"hello"),
                };
                let (v, sent) = dp.run(FROM_POD, &first);
                assert_eq!(v, TC_ACT_UNSPEC);
                assert_eq!(decode_any(&sent).dst, (a.b1, target), "flow DNATed");
                match about {
                    About::ClientPacket => (sent[ip..].to_vec(), TO_POD),
                    About::ClientPacketShort => (sent[ip..fam.l4() + 8].to_vec(), TO_POD),
                    _ => {
                        let answer = fam.reply(row.proto, (a.b1, target), client, b"answer");
                        let (_, reply) = dp.run(TO_POD, &answer);
                        assert_eq!(decode_any(&reply).src, (a.vip, port), "reply reverse-NATed");
                        (reply[ip..].to_vec(), FROM_POD)
                    }
                }
            }
        };
        let (src, dst) = match row.about {
            About::Reply | About::Nothing => (a.client, a.vip),
            _ => (who(row.from), a.client),
        };
        let frame = icmp_message_any(src, dst, row.msg.of(fam), row.msg.rest(fam), &body);

        match row.expect {
            Expect::Translated { outer, quote_src, quote_dst } => {
                let before = dp.global(verdict::ICMP_ERROR);
                let (v, out) = dp.run(prog, &frame);
                assert_eq!(v, TC_ACT_UNSPEC);
                let seen = icmp_message_view(&out).unwrap_or_else(|| panic!("not an ICMP error: {out:02x?}"));
                assert!(seen.csums_ok, "every checksum valid: {seen:?}");
                assert_eq!(seen.typ_code, row.msg.of(fam), "type and code kept");
                assert_eq!((seen.outer_src, seen.outer_dst), (who(outer.0), who(outer.1)), "outer addresses");
                assert_eq!((seen.quote_src, seen.quote_dst), (with_port(quote_src), with_port(quote_dst)), "quote");
                let rest = fam.l4() + 4;
                assert_eq!(&out[rest..rest + 4], &row.msg.rest(fam), "the 4 bytes after the checksum (MTU) kept");
                assert_eq!(dp.global(verdict::ICMP_ERROR), before + 1, "counted icmp_error");
            }
            Expect::Untouched => {
                for prog in [FROM_POD, TO_POD] {
                    let before = dp.global(verdict::OTHER_L4);
                    let (v, out) = dp.run(prog, &frame);
                    assert_eq!((v, &out), (TC_ACT_UNSPEC, &frame), "via {prog}");
                    assert_eq!(dp.global(verdict::OTHER_L4), before + 1, "via {prog}: counted other_l4");
                }
            }
            Expect::Passes => {
                let (v, out) = dp.run(TO_POD, &frame);
                assert_eq!((v, &out), (TC_ACT_UNSPEC, &frame), "not an error: untouched");
            }
        }
    });
}
