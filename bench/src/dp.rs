//! The datapath as the bench drives it: programs and maps loaded with maps sized for the
//! run, pinned under a per-run bpffs directory (removed on drop, which also unpins any
//! attachment made through `attach_pod_interface`), plus BPF_PROG_TEST_RUN helpers.
use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use proxy_tests::harness::PinDir;
use proxy_userspace::{
    dataplane::{
        maps::Maps,
        maps::loader::{self, LoaderConfig, Programs},
    },
    sync::Syncer,
};

pub struct Dataplane {
    pub programs: Programs,
    pub syncer: Syncer<Maps>,
    /// Last field: dropped after the programs.
    pub pins: PinDir,
}

impl Dataplane {
    /// Load the programs with maps big enough for `services` frontends of `backends_per`
    /// backends each (never smaller than the agent's defaults).
    pub fn load(services: usize, backends_per: usize) -> Result<Self> {
        let pins = PinDir::new();
        let mut cfg = LoaderConfig::new(&pins.0);
        cfg.max_services = cfg.max_services.max((services as u32 + 2).next_power_of_two());
        cfg.max_backends = cfg.max_backends.max(((services * backends_per) as u32 + 16).next_power_of_two());
        let (programs, maps) = loader::load(&cfg).context("loading the datapath")?;
        let mut syncer = Syncer::new(maps).context("reading back maps")?;
        // As the agent after its first sync: every frontend written from here on has its bit.
        syncer.store_mut().put_filter_in_force().context("frontend filter")?;
        Ok(Dataplane { programs, syncer, pins })
    }

    pub fn maps(&self) -> &Maps {
        self.syncer.store()
    }

    fn test_run(&mut self, prog: &'static str, frame: &[u8], repeat: u32) -> Result<(i32, Vec<u8>, f64)> {
        let mut out = vec![0u8; frame.len() + 256];
        let p = self.programs.classifier(prog)?;
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() };
        let r = p.test_run(opts).with_context(|| format!("BPF_PROG_TEST_RUN {prog}"))?;
        out.truncate(r.data_size_out as usize);
        // The kernel reports the mean duration per repetition.
        Ok((r.return_value as i32, out, r.duration.as_nanos() as f64))
    }

    /// Run `prog` once; returns (verdict, output frame).
    pub fn run(&mut self, prog: &'static str, frame: &[u8]) -> Result<(i32, Vec<u8>)> {
        let (v, out, _) = self.test_run(prog, frame, 1)?;
        Ok((v, out))
    }

    /// Run `prog` `repeat` times in one call (on the same skb); mean ns per run.
    pub fn time(&mut self, prog: &'static str, frame: &[u8], repeat: u32) -> Result<f64> {
        Ok(self.test_run(prog, frame, repeat)?.2)
    }

    /// Run the XDP program `prog` `repeat` times on `frame` as received on `ingress_ifindex`
    /// (call it from a thread inside that interface's namespace); (verdict, output frame,
    /// mean ns per run).
    pub fn xdp_run(
        &mut self,
        prog: &'static str,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, f64)> {
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex }: data = 0 (no metadata), data_end = the frame's length.
        let mut md = [0u32; 6];
        md[1] = frame.len() as u32;
        md[3] = ingress_ifindex;
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let p = self.programs.xdp(prog)?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        };
        let r = p.test_run(opts).with_context(|| format!("BPF_PROG_TEST_RUN {prog}"))?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out, r.duration.as_nanos() as f64))
    }

    /// Load an XDP program of the object that the loader leaves out (the bench-only floors).
    pub fn load_xdp(&mut self, prog: &'static str) -> Result<()> {
        self.programs.xdp(prog)?.load().with_context(|| format!("loading {prog}"))
    }
}
