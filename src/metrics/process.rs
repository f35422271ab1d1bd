//! Standard process metrics, read from `/proc` on each scrape.

/// Standard process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_start_time_seconds`), read from `/proc/self` on each scrape; nothing on other
/// systems.
#[derive(Debug)]
pub(super) struct ProcessCollector;

impl ProcessCollector {
    /// (cpu seconds, virtual bytes, start time in seconds since the epoch) from `/proc`.
    fn stat() -> Option<(f64, f64, f64)> {
        // The kernel reports times in USER_HZ, which is 100 on every Linux ABI.
        const TICKS: f64 = 100.0;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command (which may contain spaces), from field 3 (state) on.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
        let cpu = (ticks(11)? + ticks(12)?) / TICKS;
        let start_ticks = ticks(19)?;
        let vsize = ticks(20)?;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        Some((cpu, vsize, boot + start_ticks / TICKS))
    }

    fn rss_bytes() -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<f64>()
            .ok()?;
        Some(kb * 1024.0)
    }

    fn fds() -> Option<(f64, f64)> {
        #[allow(clippy::cast_precision_loss)]
        let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let max = std::fs::read_to_string("/proc/self/limits")
            .ok()?
            .lines()
            .find(|l| l.starts_with("Max open files"))?
            .split_whitespace()
            .nth(3)?
            .parse::<f64>()
            .ok()?;
        Some((open, max))
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let mut gauge = |name: &str, help: &str, value: f64| {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)
        };
        if let Some((_, vsize, start)) = Self::stat() {
            gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                vsize,
            )?;
            gauge(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                start,
            )?;
        }
        if let Some(rss) = Self::rss_bytes() {
            gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                rss,
            )?;
        }
        if let Some((open, max)) = Self::fds() {
            gauge("process_open_fds", "Number of open file descriptors", open)?;
            gauge(
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        if let Some((cpu, _, _)) = Self::stat() {
            let counter = ConstCounter::new(cpu);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}
