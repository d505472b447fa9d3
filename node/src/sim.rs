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

thread_local! {
    static NODES: RefCell<BTreeMap<u64, Weak<Node>>> = const { RefCell::new(BTreeMap::new()) };
    static APPENDS: RefCell<Vec<Append>> = const { RefCell::new(Vec::new()) };
}

/// Forgets every node and append (a new seed starts).
pub fn reset() {
    NODES.with(|n| n.borrow_mut().clear());
    APPENDS.with(|a| a.borrow_mut().clear());
}

/// Records a started node (weakly: a killed node's state is dropped with its tasks).
pub fn register(node: &Arc<Node>) {
    NODES.with(|n| {
        n.borrow_mut()
            .insert(node.config().id, Arc::downgrade(node))
    });
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
