//! What the simulation (`--cfg madsim`, in `sim-tests`) may observe of the nodes it runs: a
//! registry of the live nodes and a log of every local append. The simulator runs every node
//! of one seed on one thread, so both are thread-local; [`reset`] starts a new seed.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use crate::node::Node;

/// One successful append on a segment leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// The appending node.
    pub node: u64,
    /// The topic.
    pub topic: String,
    /// The segment appended to.
    pub segment: u64,
    /// The segment's epoch as the appender saw it.
    pub epoch: u64,
    /// Topic offset of the first entry.
    pub first: u64,
    /// Entries appended.
    pub count: u64,
}

/// A node's lease clock: it runs at `1 + ppm / 10^6` times simulated time, continuously
/// across rate changes.
#[derive(Default, Clone, Copy)]
struct Clock {
    anchor_raw: u64,
    anchor_ms: u64,
    ppm: i64,
    pending: Option<i64>,
}

impl Clock {
    fn at(&self, raw: u64) -> u64 {
        let d = raw.saturating_sub(self.anchor_raw) as i128;
        let skewed = d * (1_000_000 + self.ppm as i128) / 1_000_000;
        self.anchor_ms + skewed.max(0) as u64
    }
}

thread_local! {
    static NODES: RefCell<BTreeMap<u64, Weak<Node>>> = const { RefCell::new(BTreeMap::new()) };
    static APPENDS: RefCell<Vec<Append>> = const { RefCell::new(Vec::new()) };
    static CLOCKS: RefCell<BTreeMap<u64, Clock>> = const { RefCell::new(BTreeMap::new()) };
}

/// Forgets every node, append and clock (a new seed starts).
pub fn reset() {
    NODES.with(|n| n.borrow_mut().clear());
    APPENDS.with(|a| a.borrow_mut().clear());
    CLOCKS.with(|c| c.borrow_mut().clear());
}

/// Records a started node (weakly: a killed node's state is dropped with its tasks).
pub fn register(node: &Arc<Node>) {
    let id = node.config().id;
    NODES.with(|n| n.borrow_mut().insert(id, Arc::downgrade(node)));
    // A new process starts its clock from zero, at the rate the node's oscillator has.
    CLOCKS.with(|c| {
        let mut c = c.borrow_mut();
        let ppm = c.get(&id).map_or(0, |k| k.pending.unwrap_or(k.ppm));
        c.insert(
            id,
            Clock {
                ppm,
                ..Clock::default()
            },
        );
    });
}

/// Makes node `id`'s lease clock run `ppm` parts per million fast (negative: slow) from now on.
pub fn set_clock_rate(id: u64, ppm: i64) {
    CLOCKS.with(|c| c.borrow_mut().entry(id).or_default().pending = Some(ppm));
}

/// Node `id`'s lease clock reading, given its unskewed reading `raw` (ms since it started).
pub(crate) fn skewed_ms(id: u64, raw: u64) -> u64 {
    CLOCKS.with(|c| {
        let mut c = c.borrow_mut();
        let k = c.entry(id).or_default();
        if let Some(ppm) = k.pending.take() {
            k.anchor_ms = k.at(raw);
            k.anchor_raw = raw;
            k.ppm = ppm;
        }
        k.at(raw)
    })
}

/// The running incarnation of node `id`, if any.
pub fn node(id: u64) -> Option<Arc<Node>> {
    NODES.with(|n| n.borrow().get(&id).and_then(Weak::upgrade))
}

pub(crate) fn record_append(a: Append) {
    APPENDS.with(|v| v.borrow_mut().push(a));
}

/// Takes the appends recorded since the last call.
pub fn take_appends() -> Vec<Append> {
    APPENDS.with(|v| std::mem::take(&mut *v.borrow_mut()))
}
