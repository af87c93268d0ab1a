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
        let syncer = Syncer::new(maps).context("reading back maps")?;
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
}
