//! Everything one seed decides: cluster size, workload and fault rates ("swarm" testing: each
//! seed enables a different mix of faults at different rates).

use std::fmt;

use walrus_core::cluster::lease::LeaseConfig;

use crate::rng::Rng;

/// The parameters of one run, all derived from its seed.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The seed.
    pub seed: u64,
    /// Cluster nodes (3..=5).
    pub nodes: usize,
    /// Topics.
    pub topics: usize,
    /// Producer clients.
    pub producers: usize,
    /// Consumer clients (shared-cursor GETs).
    pub consumers: usize,
    /// Payload bytes per entry.
    pub payload_min: usize,
    /// Payload bytes per entry.
    pub payload_max: usize,
    /// Entries per PUT, at most.
    pub batch_max: usize,
    /// Rollover limit (entries per segment).
    pub segment_entries: u64,
    /// Lease timing (simulated milliseconds).
    pub lease: LeaseConfig,
    /// Node timer period.
    pub tick_ms: u64,
    /// Network delay upper bound for an ordinary message.
    pub max_delay_ms: u64,
    /// Disk write + fsync latency upper bound.
    pub max_disk_ms: u64,
    /// Message loss, parts per million.
    pub loss_ppm: u64,
    /// Message duplication, ppm.
    pub dup_ppm: u64,
    /// Long delay (which also reorders), ppm.
    pub long_delay_ppm: u64,
    /// Fsync failure per disk operation, ppm.
    pub fsync_ppm: u64,
    /// Mean gap between node crashes (0 = none).
    pub crash_every_ms: u64,
    /// Mean gap between partitions (0 = none).
    pub partition_every_ms: u64,
    /// Mean gap between clock skew changes (0 = none).
    pub skew_every_ms: u64,
    /// Length of the safety (faulty) phase.
    pub safety_ms: u64,
    /// Length of the liveness (healed) phase.
    pub liveness_ms: u64,
}

impl SimConfig {
    /// Derives a configuration from `seed`.
    pub fn from_seed(seed: u64) -> SimConfig {
        let mut r = Rng::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let on = |r: &mut Rng, p: u64| r.chance_ppm(p * 10_000);
        let nodes = r.range(3, 5) as usize;
        let payload_min = r.range(1, 16) as usize;
        SimConfig {
            seed,
            nodes,
            topics: r.range(1, 3) as usize,
            producers: r.range(1, 3) as usize,
            consumers: r.range(1, 2) as usize,
            payload_min,
            payload_max: payload_min + r.range(0, 48) as usize,
            batch_max: r.range(1, 3) as usize,
            segment_entries: r.range(2, 24),
            lease: LeaseConfig {
                lease_duration_ms: 300,
                max_clock_drift_ms: 100,
                detection_timeout_ms: 500,
            },
            tick_ms: 50,
            max_delay_ms: r.range(2, 20),
            max_disk_ms: r.range(1, 15),
            loss_ppm: if on(&mut r, 60) {
                r.range(1_000, 80_000)
            } else {
                0
            },
            dup_ppm: if on(&mut r, 50) {
                r.range(1_000, 50_000)
            } else {
                0
            },
            long_delay_ppm: if on(&mut r, 50) {
                r.range(1_000, 50_000)
            } else {
                0
            },
            fsync_ppm: if on(&mut r, 40) {
                r.range(500, 8_000)
            } else {
                0
            },
            crash_every_ms: if on(&mut r, 60) {
                r.range(400, 2_000)
            } else {
                0
            },
            partition_every_ms: if on(&mut r, 60) {
                r.range(400, 2_000)
            } else {
                0
            },
            skew_every_ms: if on(&mut r, 50) {
                r.range(200, 1_500)
            } else {
                0
            },
            safety_ms: 3_000,
            liveness_ms: 6_000,
        }
    }
}

impl fmt::Display for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={} nodes={} topics={} producers={} consumers={} payload={}..={}B batch<={} \
             segment_entries={} lease={}/{}/{}ms delay<={}ms disk<={}ms loss={}ppm dup={}ppm \
             long_delay={}ppm fsync_err={}ppm crash_every={}ms partition_every={}ms \
             skew_every={}ms phases={}+{}ms",
            self.seed,
            self.nodes,
            self.topics,
            self.producers,
            self.consumers,
            self.payload_min,
            self.payload_max,
            self.batch_max,
            self.segment_entries,
            self.lease.lease_duration_ms,
            self.lease.max_clock_drift_ms,
            self.lease.detection_timeout_ms,
            self.max_delay_ms,
            self.max_disk_ms,
            self.loss_ppm,
            self.dup_ppm,
            self.long_delay_ppm,
            self.fsync_ppm,
            self.crash_every_ms,
            self.partition_every_ms,
            self.skew_every_ms,
            self.safety_ms,
            self.liveness_ms
        )
    }
}
