//! Node saturation: CPU, memory, disk and network of the Proxmox node, sampled with sysinfo.
//!
//! Sampling runs on a blocking thread every `interval` (reading `/proc` is synchronous) and only
//! sets gauges and advances counters; it never blocks the pipeline.

use std::collections::HashMap;
use std::time::Duration;

use edgeflow_runtime::CancellationToken;
use sysinfo::{Disks, Networks, System};

use crate::metrics::{DeviceLabel, Metrics};

/// Filesystems that say nothing about the node's storage.
const PSEUDO_FS: &[&str] = &["tmpfs", "devtmpfs", "overlay", "squashfs", "proc", "sysfs", "ramfs", "efivarfs"];

/// Samples until `shutdown`.
pub async fn run(metrics: Metrics, interval: Duration, shutdown: CancellationToken) {
    let Ok(mut sampler) = tokio::task::spawn_blocking(Sampler::new).await else { return };
    let Some(s) = sampler.as_mut() else {
        tracing::warn!("node saturation metrics are unavailable on this system");
        return;
    };
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut owned = std::mem::replace(s, Sampler::empty());
        let m = metrics.clone();
        match tokio::task::spawn_blocking(move || {
            owned.sample(&m);
            owned
        })
        .await
        {
            Ok(back) => *s = back,
            Err(_) => return,
        }
    }
}

struct Sampler {
    system: Option<System>,
    disks: Option<Disks>,
    networks: Option<Networks>,
    /// Last totals seen, to advance counters by the difference.
    last: HashMap<(&'static str, String), u64>,
}

impl Sampler {
    fn empty() -> Self {
        Sampler { system: None, disks: None, networks: None, last: HashMap::new() }
    }

    fn new() -> Option<Self> {
        let system = System::new().ok()?;
        Some(Sampler {
            system: Some(system),
            disks: Disks::new_with_refreshed_list().ok(),
            networks: Networks::new_with_refreshed_list().ok(),
            last: HashMap::new(),
        })
    }

    fn advance(
        &mut self,
        kind: &'static str,
        name: &str,
        total: u64,
        counter: &prometheus_client::metrics::counter::Counter,
    ) {
        let prev = self.last.insert((kind, name.to_owned()), total);
        if let Some(prev) = prev {
            counter.inc_by(total.saturating_sub(prev));
        } else {
            counter.inc_by(total);
        }
    }

    fn sample(&mut self, m: &Metrics) {
        if let Some(sys) = self.system.as_mut() {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            m.node_cpu_utilization.set(f64::from(sys.global_cpu_usage()) / 100.0);
            m.node_memory_used.set(sys.used_memory() as i64);
            m.node_memory_total.set(sys.total_memory() as i64);
            m.node_swap_used.set(sys.used_swap() as i64);
        }
        if let Ok(load) = System::load_average() {
            m.node_load1.set(load.one);
        }
        let mut disk_totals = Vec::new();
        if let Some(disks) = self.disks.as_mut() {
            disks.refresh(true);
            for d in disks.iter() {
                let fs = d.file_system().to_string_lossy();
                if PSEUDO_FS.contains(&fs.as_ref()) {
                    continue;
                }
                let mount = d.mount_point().to_string_lossy().into_owned();
                let label = DeviceLabel { device: mount.clone() };
                m.node_disk_total.get_or_create(&label).set(d.total_space() as i64);
                m.node_disk_used.get_or_create(&label).set(d.total_space().saturating_sub(d.available_space()) as i64);
                let usage = d.usage();
                disk_totals.push((mount, usage.total_read_bytes, usage.total_written_bytes));
            }
        }
        for (mount, read, written) in disk_totals {
            let label = DeviceLabel { device: mount.clone() };
            self.advance("read", &mount, read, &m.node_disk_read.get_or_create_owned(&label));
            self.advance("written", &mount, written, &m.node_disk_written.get_or_create_owned(&label));
        }
        let mut net_totals = Vec::new();
        if let Some(nets) = self.networks.as_mut() {
            nets.refresh(true);
            for (name, data) in nets.iter() {
                net_totals.push((name.to_string_lossy().into_owned(), data.total_received(), data.total_transmitted()));
            }
        }
        for (name, rx, tx) in net_totals {
            let label = DeviceLabel { device: name.clone() };
            self.advance("rx", &name, rx, &m.node_network_received.get_or_create_owned(&label));
            self.advance("tx", &name, tx, &m.node_network_transmitted.get_or_create_owned(&label));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_fills_node_metrics() {
        let mut registry = prometheus_client::registry::Registry::default();
        let m = Metrics::register(&mut registry);
        let mut s = Sampler::new().expect("sysinfo works on Linux");
        s.sample(&m);
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        s.sample(&m);
        assert!(m.node_memory_total.get() > 0);
        assert!(m.node_memory_used.get() > 0);
        let cpu = m.node_cpu_utilization.get();
        assert!((0.0..=1.0).contains(&cpu), "{cpu}");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("edgeflow_node_network_receive_bytes_total{device=\"lo\"}"), "{text}");
    }
}
