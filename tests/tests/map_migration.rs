//! Pinned maps whose definition changed: re-used when equal, migrated when the size, type or
//! flags changed (entries carried over), refused when the key/value layout changed. Loads the
//! datapath under a per-test bpffs directory; no interface is touched.
use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData, MapType, PerCpuArray, PerCpuValues};
use proxy_common::{CT_DIR_FORWARD, Counters, CtKey, CtValue, PROTO_TCP, StatsFamily, map_names as n};
use proxy_tests::harness::{PinDir, entry, frontend, require_root, state};
use proxy_userspace::{
    dataplane::{
        DataplaneError,
        maps::loader::{self, LoaderConfig},
        maps::{Maps, global_counters, global_total},
    },
    model::Protocol,
    sync::Syncer,
};

fn cfg(pins: &PinDir, services: u32, conntrack: u32) -> LoaderConfig {
    LoaderConfig { max_services: services, max_backends: 256, max_conntrack: conntrack, ..LoaderConfig::new(&pins.0) }
}

fn ct(i: u32) -> (CtKey, CtValue) {
    (
        CtKey {
            src_addr: u32::from(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8)).to_be(),
            dst_addr: u32::from(Ipv4Addr::new(10, 96, 0, 1)).to_be(),
            src_port: (40000 + (i % 20000) as u16).to_be(),
            dst_port: 80u16.to_be(),
            proto: PROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        },
        CtValue { backend_id: i, svc_id: 7, nat_port: 8080u16.to_be(), ..Default::default() },
    )
}

fn pin_info(pins: &PinDir, name: &str) -> aya::maps::MapInfo {
    MapData::from_pin(pins.0.join("maps").join(name)).expect("pin").info().expect("info")
}

fn migrating_entries(pins: &PinDir) -> usize {
    std::fs::read_dir(pins.0.join("migrating")).map(|d| d.count()).unwrap_or(0)
}

/// A larger --max-conntrack and a smaller --max-services on restart: new maps of the new
/// sizes, every entry carried over, the old maps unpinned when the migration finishes.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn size_change_migrates_entries() {
    require_root("size_change_migrates_entries");
    let pins = PinDir::new();
    let services: Vec<_> = (1..=20)
        .map(|i| {
            (
                frontend(Ipv4Addr::new(10, 96, 1, i), 80, Protocol::Tcp),
                entry(&format!("s{i}"), &[(Ipv4Addr::new(10, 244, 0, i), 8080)]),
            )
        })
        .collect();
    {
        let (progs, maps) = loader::load(&cfg(&pins, 64, 1024)).expect("first load");
        assert!(progs.migration.is_empty());
        let mut syncer = Syncer::new(maps).unwrap();
        assert!(syncer.apply(&state(services.clone())).errors.is_empty());
        let maps = syncer.store_mut();
        for i in 0..500 {
            let (k, v) = ct(i);
            maps.conntrack.insert(k, v, 0).unwrap();
        }
    }
    // Same configuration: re-used, nothing to migrate.
    {
        let (progs, _maps) = loader::load(&cfg(&pins, 64, 1024)).expect("same load");
        assert!(progs.migration.is_empty(), "equal pins are re-used");
    }
    let (mut progs, maps) = loader::load(&cfg(&pins, 32, 4096)).expect("load with new sizes");
    let mut migrating = progs.migration.maps();
    migrating.sort();
    // The IPv6 twins follow the same flags, so they migrate with their IPv4 maps.
    assert_eq!(
        migrating,
        vec![
            n::CONNTRACK,
            n::CONNTRACK6,
            n::CT_NEW,
            n::CT_NEW6,
            n::SERVICES,
            n::SERVICES6,
            n::SERVICE_META,
            n::SERVICE_STATS
        ]
    );
    assert_eq!(maps.capacities().conntrack, 4096);
    assert_eq!(maps.capacities().services, 32);
    assert_eq!(pin_info(&pins, n::CONNTRACK).max_entries(), 4096);
    assert_eq!(maps.conntrack.iter().count(), 500, "conntrack copied before the programs run");
    let mut syncer = Syncer::new(maps).unwrap();
    assert_eq!(syncer.service_count(), 20);
    assert_eq!(syncer.apply(&state(services)).writes, 0, "every service carried over as it was");

    // An entry the old programs create before the swap is carried over by `finish`.
    let old = migrating_entries(&pins);
    assert_eq!(old, 8, "old maps pinned aside until the swap");
    let aside = std::fs::read_dir(pins.0.join("migrating"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("CONNTRACK-"))
        .unwrap()
        .path();
    let mut old_ct: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(Map::from_map_data(MapData::from_pin(&aside).unwrap()).unwrap()).unwrap();
    let (k, v) = ct(9999);
    old_ct.insert(k, v, 0).unwrap();
    let done = std::mem::take(&mut progs.migration).finish().expect("finish");
    let c = done.iter().find(|m| m.map == n::CONNTRACK).unwrap();
    eprintln!(
        "CONNTRACK {} -> {}: {} copied, {} after the swap",
        c.old.max_entries, c.new.max_entries, c.copied, c.copied_after_swap
    );
    assert_eq!((c.old.max_entries, c.new.max_entries, c.copied, c.copied_after_swap), (1024, 4096, 500, 1));
    let s = done.iter().find(|m| m.map == n::SERVICES).unwrap();
    assert_eq!((s.old.max_entries, s.new.max_entries, s.copied, s.copied_after_swap), (64, 32, 20, 0));
    assert_eq!(migrating_entries(&pins), 0, "old maps unpinned");
    assert!(syncer.store().conntrack.get(&k, 0).is_ok());
}

fn create_pinned(pins: &PinDir, name: &str, map_type: MapType, key: u32, value: u32, max: u32) -> MapData {
    std::fs::create_dir_all(pins.0.join("maps")).unwrap();
    let obj = aya_obj::maps::Map::new_from_params(map_type as u32, key, value, max, 0);
    let m = MapData::create(obj, name, None).expect("create map");
    m.pin(pins.0.join("maps").join(name)).expect("pin");
    m
}

/// A map type change with the same layout (CONNTRACK as a plain HASH pinned, the object
/// declares another type): migrated, live entries carried over.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn type_change_migrates_entries() {
    require_root("type_change_migrates_entries");
    let pins = PinDir::new();
    let c = cfg(&pins, 64, 1024);
    let declared = loader::declared_maps(&c).unwrap()[n::CONNTRACK];
    // Whatever the object declares, pin the other hash flavour.
    let other = if declared.map_type == MapType::LruHash as u32 { MapType::Hash } else { MapType::LruHash };
    let size = |v: usize| v as u32;
    let data = create_pinned(&pins, n::CONNTRACK, other, size(size_of::<CtKey>()), size(size_of::<CtValue>()), 1024);
    let mut old: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    for i in 0..100 {
        let (k, v) = ct(i);
        old.insert(k, v, 0).unwrap();
    }
    let (progs, maps) = loader::load(&c).expect("load");
    assert_eq!(progs.migration.maps(), vec![n::CONNTRACK]);
    assert_eq!(pin_info(&pins, n::CONNTRACK).map_type().unwrap() as u32, declared.map_type);
    let copied: Vec<(CtKey, CtValue)> = maps.conntrack.iter().map(Result::unwrap).collect();
    assert_eq!(copied.len(), 100);
    // The value may pass through the map's upgrade hook (flags); what it points at stays.
    let (k, v) = ct(42);
    assert!(copied.iter().any(|(ck, cv)| *ck == k && cv.backend_id == v.backend_id && cv.nat_port == v.nat_port));
}

/// GLOBAL_STATS pinned by an agent from before the per-family counters (one flat block of
/// 17 verdicts): migrated index by index, so its counts read back in the `other` block, no
/// node-wide total changes, and the new programs count into the family blocks beside them.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn flat_global_stats_migrates_into_the_other_block() {
    require_root("flat_global_stats_migrates_into_the_other_block");
    let pins = PinDir::new();
    let c = cfg(&pins, 64, 1024);
    let size = |v: usize| v as u32;
    let data = create_pinned(&pins, n::GLOBAL_STATS, MapType::PerCpuArray, 4, size(size_of::<Counters>()), 17);
    let mut old: PerCpuArray<MapData, Counters> = PerCpuArray::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    for v in 0..17u32 {
        // CPU i holds (v+1)*(i+1) packets: the per-CPU slots must be carried over one by one.
        let per_cpu: Vec<Counters> = (0..cpus as u64)
            .map(|i| Counters { packets: (v as u64 + 1) * (i + 1), bytes: 100 * (v as u64 + 1) })
            .collect();
        old.set(v, PerCpuValues::try_from(per_cpu).unwrap(), 0).unwrap();
    }
    let (progs, maps) = loader::load(&c).expect("load");
    assert_eq!(progs.migration.maps(), vec![n::GLOBAL_STATS]);
    assert_eq!(pin_info(&pins, n::GLOBAL_STATS).max_entries(), proxy_common::GLOBAL_STATS_LEN);
    let per_cpu_sum: u64 = (1..=cpus as u64).sum();
    for v in 0..17u32 {
        let want = (v as u64 + 1) * per_cpu_sum;
        let other = global_counters(&maps.global_stats, StatsFamily::Other, v).unwrap();
        assert_eq!((other.packets, other.bytes), (want, 100 * (v as u64 + 1) * cpus as u64), "verdict {v}");
        assert_eq!(global_total(&maps.global_stats, v).unwrap().packets, want, "total of verdict {v} kept");
        for f in [StatsFamily::Ipv4, StatsFamily::Ipv6] {
            assert_eq!(
                global_counters(&maps.global_stats, f, v).unwrap().packets,
                0,
                "{} block starts empty",
                f.name()
            );
        }
    }
}

/// Another key/value layout cannot be migrated: the load fails naming the map and the way
/// out, and leaves the pin exactly as it was.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn incompatible_layout_is_refused() {
    require_root("incompatible_layout_is_refused");
    let pins = PinDir::new();
    let c = cfg(&pins, 64, 1024);
    let declared = loader::declared_maps(&c).unwrap()[n::CONNTRACK];
    let data = create_pinned(&pins, n::CONNTRACK, MapType::LruHash, declared.key_size, declared.value_size + 8, 1024);
    let id = data.info().unwrap().id();
    let err = match loader::load(&c) {
        Err(e) => e,
        Ok(_) => panic!("an incompatible pin was re-used"),
    };
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(&err, DataplaneError::IncompatiblePin { map, .. } if map == "CONNTRACK"), "{msg}");
    assert!(msg.contains("ebpf-proxy cleanup") && msg.contains(&pins.0.display().to_string()), "{msg}");
    assert_eq!(pin_info(&pins, n::CONNTRACK).id(), id, "pin untouched");
    assert_eq!(migrating_entries(&pins), 0);
}

/// Services that would not fit into a smaller --max-services: refused, and the old maps are
/// put back so the next start (with a size that fits) sees them all.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn too_small_for_the_services_rolls_back() {
    require_root("too_small_for_the_services_rolls_back");
    let pins = PinDir::new();
    let services: Vec<_> = (1..=20)
        .map(|i| {
            (
                frontend(Ipv4Addr::new(10, 96, 1, i), 80, Protocol::Tcp),
                entry(&format!("s{i}"), &[(Ipv4Addr::new(10, 244, 0, 1), 8080)]),
            )
        })
        .collect();
    {
        let (_p, maps) = loader::load(&cfg(&pins, 64, 1024)).unwrap();
        let mut syncer = Syncer::new(maps).unwrap();
        assert!(syncer.apply(&state(services.clone())).errors.is_empty());
    }
    let err = match loader::load(&cfg(&pins, 16, 1024)) {
        Err(e) => e,
        Ok(_) => panic!("20 services squeezed into 16"),
    };
    eprintln!("{err}");
    assert!(err.to_string().contains("raise --max-services"), "{err}");
    assert_eq!(pin_info(&pins, n::SERVICES).max_entries(), 64, "old map back in place");
    assert_eq!(migrating_entries(&pins), 0);
    let maps = Maps::open_pinned(&pins.0).unwrap();
    assert_eq!(maps.services.iter().count(), 20);
}

/// `--max-source-ranges` resizes both tries by migration: larger keeps every prefix, and
/// smaller than what the Services hold is refused naming the flag (a full trie answers
/// ENOSPC, not a hash map's E2BIG), with the old trie back in place.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn max_source_ranges_migrates_and_refuses_to_drop_ranges() {
    require_root("max_source_ranges_migrates_and_refuses_to_drop_ranges");
    let pins = PinDir::new();
    let sized = |n: u32| LoaderConfig { max_source_ranges: n, ..cfg(&pins, 64, 1024) };
    let mut lb = entry("lb", &[(Ipv4Addr::new(10, 244, 0, 1), 8080)]);
    lb.kind = proxy_userspace::model::FrontendKind::LoadBalancer;
    lb.source_ranges = (0..6u8)
        .map(|i| proxy_userspace::model::IpPrefix { addr: Ipv4Addr::new(192, 0, i, 0).into(), len: 24 })
        .collect();
    let desired = state(vec![(frontend(Ipv4Addr::new(198, 51, 100, 1), 80, Protocol::Tcp), lb)]);
    {
        let (_p, maps) = loader::load(&sized(8)).unwrap();
        assert!(Syncer::new(maps).unwrap().apply(&desired).errors.is_empty());
    }
    assert_eq!(pin_info(&pins, n::SOURCE_RANGES).max_entries(), 8);
    {
        let (mut p, _maps) = loader::load(&sized(32)).unwrap();
        std::mem::take(&mut p.migration).finish().expect("finish");
    }
    assert_eq!(
        (pin_info(&pins, n::SOURCE_RANGES).max_entries(), pin_info(&pins, n::SOURCE_RANGES6).max_entries()),
        (32, 32)
    );
    assert_eq!(Maps::open_pinned(&pins.0).unwrap().source_ranges.iter().count(), 6);
    let err = match loader::load(&sized(4)) {
        Err(e) => e,
        Ok(_) => panic!("6 ranges squeezed into 4"),
    };
    assert!(err.to_string().contains("raise --max-source-ranges"), "{err}");
    assert_eq!(pin_info(&pins, n::SOURCE_RANGES).max_entries(), 32, "old trie back in place");
    assert_eq!(Maps::open_pinned(&pins.0).unwrap().source_ranges.iter().count(), 6);
}

/// A migration interrupted before the swap (the agent died) keeps the old map pinned aside;
/// the next start copies from it again and finishes.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn interrupted_migration_is_resumed() {
    require_root("interrupted_migration_is_resumed");
    let pins = PinDir::new();
    {
        let (_p, maps) = loader::load(&cfg(&pins, 64, 1024)).unwrap();
        for i in 0..300 {
            let (k, v) = ct(i);
            maps.conntrack.clone_insert(k, v);
        }
    }
    {
        // Loaded with the new size, then dropped before `finish` (as a kill -9 would).
        let (p, _maps) = loader::load(&cfg(&pins, 64, 2048)).unwrap();
        assert_eq!(p.migration.maps(), vec![n::CONNTRACK, n::CONNTRACK6, n::CT_NEW, n::CT_NEW6]);
    }
    assert_eq!(migrating_entries(&pins), 4, "old maps (both families, both tables) still pinned aside");
    // The entry the old programs created after the first copy.
    let aside = std::fs::read_dir(pins.0.join("migrating"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("CONNTRACK-")))
        .unwrap();
    let mut old_ct: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(Map::from_map_data(MapData::from_pin(&aside).unwrap()).unwrap()).unwrap();
    let (k, v) = ct(5000);
    old_ct.insert(k, v, 0).unwrap();
    let (mut p, maps) = loader::load(&cfg(&pins, 64, 2048)).unwrap();
    assert_eq!(p.migration.maps(), vec![n::CONNTRACK, n::CONNTRACK6, n::CT_NEW, n::CT_NEW6], "resumed");
    assert_eq!(maps.conntrack.iter().count(), 301);
    std::mem::take(&mut p.migration).finish().unwrap();
    assert_eq!(migrating_entries(&pins), 0);
    assert_eq!(pin_info(&pins, n::CONNTRACK).max_entries(), 2048);
}

/// The bytes of `v` up to `ifindex`: a value of the layout before the assured table.
fn old_bytes<A: Copy, const N: usize>(v: &CtValue<A>) -> [u8; N] {
    assert_eq!(N, std::mem::offset_of!(CtValue<A>, ifindex));
    let mut out = [0u8; N];
    // SAFETY: `CtValue` is plain `#[repr(C)]` integers, larger than N bytes (checked above).
    unsafe { std::ptr::copy_nonoverlapping((v as *const CtValue<A>).cast::<u8>(), out.as_mut_ptr(), N) };
    out
}

/// Issue 19, upgrade in place: CONNTRACK and CONNTRACK6 pinned by the agent before the
/// assured table (values of 32 and 56 bytes) are carried over into the new layout instead
/// of refusing to start: answered flows become assured (in CONNTRACK, never evicted), the
/// unanswered one goes to CT_NEW, the new fields are marked unknown, and the CLI reads them.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn older_conntrack_layout_is_carried_over() {
    use proxy_common::{CT_DIR_REPLY, CtKey6, CtValue6, Ipv6Words, PROTO_UDP, ct_flags};
    require_root("older_conntrack_layout_is_carried_over");
    let pins = PinDir::new();
    let c = cfg(&pins, 64, 1024);
    let declared = loader::declared_maps(&c).unwrap();
    let ct_decl = declared[n::CONNTRACK];
    let ct6_decl = declared[n::CONNTRACK6];
    assert!(ct_decl.value_size > 32 && ct6_decl.value_size > 56, "the layout grew");
    let t = |m: &proxy_userspace::dataplane::maps::migrate::MapSpec| {
        if m.map_type == MapType::LruHash as u32 { MapType::LruHash } else { MapType::Hash }
    };
    let old4 = create_pinned(&pins, n::CONNTRACK, t(&ct_decl), 16, 32, 1024);
    let old6 = create_pinned(&pins, n::CONNTRACK6, t(&ct6_decl), 40, 56, 1024);
    let mut old4: HashMap<MapData, CtKey, [u8; 32]> = HashMap::try_from(Map::from_map_data(old4).unwrap()).unwrap();
    let mut old6: HashMap<MapData, CtKey6, [u8; 56]> = HashMap::try_from(Map::from_map_data(old6).unwrap()).unwrap();

    // IPv4: an established TCP flow, a half-closed one, a SYN still unanswered, a UDP stream.
    let flow = |sport: u16, proto: u8, flags: u8| {
        let (mut k, mut v) = ct(u32::from(sport));
        k.proto = proto;
        v.nat_addr = u32::from(Ipv4Addr::new(10, 244, 0, 9)).to_be();
        v.flags = flags;
        v.last_seen = 1_000;
        let rk = k.reply_of_forward(&v);
        let rv = CtValue { nat_addr: k.dst_addr, nat_port: k.dst_port, flags, last_seen: 1_000, ..v };
        [(k, v), (rk, rv)]
    };
    let est = flow(1, PROTO_TCP, ct_flags::SEEN_REPLY);
    let half_closed = flow(2, PROTO_TCP, ct_flags::SEEN_REPLY | ct_flags::CLOSING | ct_flags::FIN_FWD);
    let syn = flow(3, PROTO_TCP, 0);
    let udp = flow(4, PROTO_UDP, ct_flags::SEEN_REPLY);
    for (k, v) in [est, half_closed, syn, udp].concat() {
        old4.insert(k, old_bytes::<u32, 32>(&v), 0).unwrap();
    }
    // IPv6: one established TCP flow.
    let a6 = |last: u32| -> Ipv6Words { [0xfd00u32.to_be(), 0, 0, last.to_be()] };
    let k6 = CtKey6 {
        src_addr: a6(1),
        dst_addr: a6(2),
        src_port: 40000u16.to_be(),
        dst_port: 80u16.to_be(),
        proto: PROTO_TCP,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    let v6 = CtValue6 {
        nat_addr: a6(3),
        nat_port: 8080u16.to_be(),
        flags: ct_flags::SEEN_REPLY,
        svc_id: 7,
        backend_id: 1,
        last_seen: 1_000,
        ..Default::default()
    };
    let rk6 = k6.reply_of_forward(&v6);
    let rv6 = CtValue6 { nat_addr: k6.dst_addr, nat_port: k6.dst_port, ..v6 };
    old6.insert(k6, old_bytes::<Ipv6Words, 56>(&v6), 0).unwrap();
    old6.insert(rk6, old_bytes::<Ipv6Words, 56>(&rv6), 0).unwrap();

    let (mut progs, maps) = loader::load(&c).expect("an older conntrack layout is migrated, not refused");
    let mut migrating = progs.migration.maps();
    migrating.sort();
    assert_eq!(migrating, vec![n::CONNTRACK, n::CONNTRACK6]);
    assert_eq!(pin_info(&pins, n::CONNTRACK).value_size(), ct_decl.value_size);

    let assured_flags = |f: u8| f | ct_flags::ASSURED | ct_flags::SEEN_REPLY;
    for [(k, v), (rk, rv)] in [est, half_closed, udp] {
        let got = maps.conntrack.get(&k, 0).expect("answered flow in the assured table");
        assert_eq!(
            (got.nat_addr, got.nat_port, got.backend_id, got.svc_id),
            (v.nat_addr, v.nat_port, v.backend_id, v.svc_id)
        );
        assert_eq!(got.flags, assured_flags(v.flags));
        let seq_unknown = if k.proto == PROTO_TCP { proxy_common::ct::SEQ_UNKNOWN } else { 0 };
        assert_eq!(
            (got.ifindex, got.seq_end, got.seq_flags, got.last_seen),
            (0, 0, seq_unknown, 1_000),
            "interface and sequence position unknown, to be learnt"
        );
        let rgot = maps.conntrack.get(&rk, 0).expect("its reply entry too");
        assert!(k.reply_belongs(&rgot));
        assert_eq!((rgot.flags, rgot.seq_flags), (assured_flags(rv.flags), seq_unknown));
        assert!(maps.ct_new.get(&k, 0).is_err() && maps.ct_new.get(&rk, 0).is_err(), "one table per flow");
    }
    let [(sk, _), (srk, _)] = syn;
    assert!(maps.ct_new.get(&sk, 0).is_ok() && maps.ct_new.get(&srk, 0).is_ok(), "the unanswered SYN is unassured");
    assert!(maps.conntrack.get(&sk, 0).is_err());
    let got6 = maps.conntrack6.get(&k6, 0).expect("IPv6 flow carried over");
    assert_eq!(got6.flags, assured_flags(ct_flags::SEEN_REPLY));
    assert!(maps.conntrack6.get(&rk6, 0).is_ok());
    assert_eq!(rk6.dir, CT_DIR_REPLY);

    // The CLI reads them as netfilter would list them.
    let rows = proxy_userspace::show::read_conntrack(&maps).unwrap();
    let established = rows.iter().filter(|r| r.direction == "forward" && r.label == "ESTABLISHED" && r.assured).count();
    assert_eq!(established, 2, "IPv4 and IPv6 established flows");
    assert!(rows.iter().any(|r| r.label == "CLOSE_WAIT" && r.assured && r.table == "CONNTRACK"));
    assert!(rows.iter().any(|r| r.label == "SYN_SENT" && !r.assured && r.table == "CT_NEW"));
    assert!(rows.iter().any(|r| r.label == "ASSURED" && r.protocol == "UDP"));

    // A flow the old programs open before the swap is carried over by `finish`.
    let aside = std::fs::read_dir(pins.0.join("migrating"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("CONNTRACK-")))
        .unwrap();
    let mut aside: HashMap<MapData, CtKey, [u8; 32]> =
        HashMap::try_from(Map::from_map_data(MapData::from_pin(&aside).unwrap()).unwrap()).unwrap();
    let late = flow(5, PROTO_TCP, ct_flags::SEEN_REPLY);
    for (k, v) in late {
        aside.insert(k, old_bytes::<u32, 32>(&v), 0).unwrap();
    }
    let done = std::mem::take(&mut progs.migration).finish().expect("finish");
    let m = done.iter().find(|m| m.map == n::CONNTRACK).unwrap();
    assert_eq!((m.copied, m.copied_after_swap, m.dropped), (8, 2, 0));
    assert!(maps.conntrack.get(&late[0].0, 0).is_ok());
    assert_eq!(migrating_entries(&pins), 0, "old maps unpinned");
}

trait CloneInsert {
    fn clone_insert(&self, k: CtKey, v: CtValue);
}

/// Insert through a second handle on the same map (the loaded one is borrowed immutably).
impl CloneInsert for HashMap<MapData, CtKey, CtValue> {
    fn clone_insert(&self, k: CtKey, v: CtValue) {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let fd = self.map().fd().as_fd().try_clone_to_owned().unwrap();
        let mut h: HashMap<MapData, CtKey, CtValue> =
            HashMap::try_from(Map::from_map_data(MapData::from_fd(fd).unwrap()).unwrap()).unwrap();
        h.insert(k, v, 0).unwrap();
    }
}
