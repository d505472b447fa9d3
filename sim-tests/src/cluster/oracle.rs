//! The client oracle: every PUT sent, every PUT acknowledged (with its offset) and every entry a
//! GET handed out. Judged at the end of a run.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::checkers::Violation;

/// What the clients of one run did and saw.
#[derive(Default)]
pub struct Oracle {
    /// (topic, producer, seq) -> payload, for every PUT sent.
    sent: HashMap<(usize, usize, u64), Vec<u8>>,
    /// (topic, producer, seq, offset) of every acknowledged PUT, in acknowledgement order.
    acked: Vec<(usize, usize, u64, u64)>,
    /// Per topic, the (producer, seq) of every entry delivered.
    delivered: BTreeMap<usize, BTreeSet<(usize, u64)>>,
    delivered_total: u64,
    /// Per topic, GETs sent that got no reply: each may have consumed an entry that was then
    /// lost in flight (the protocol has no consumer acknowledgement). An `ERR` reply is not
    /// one of them: a node answers `ERR` only if it handed nothing out.
    gets_in_doubt: BTreeMap<usize, u64>,
    /// PUTs that got `ERR` or no reply in time.
    pub put_failures: u64,
}

impl Oracle {
    /// A PUT is about to be sent.
    pub fn sent(&mut self, topic: usize, producer: usize, seq: u64, payload: Vec<u8>) {
        self.sent.insert((topic, producer, seq), payload);
    }

    /// A PUT was acknowledged at `offset`.
    pub fn acked(&mut self, topic: usize, producer: usize, seq: u64, offset: u64) {
        self.acked.push((topic, producer, seq, offset));
    }

    /// A GET on `topic` was sent but never answered.
    pub fn get_in_doubt(&mut self, topic: usize) {
        *self.gets_in_doubt.entry(topic).or_default() += 1;
    }

    /// The highest acknowledged offset of each topic (by index).
    pub fn highest_acked(&self) -> BTreeMap<usize, u64> {
        let mut m = BTreeMap::new();
        for &(t, _, _, off) in &self.acked {
            let e = m.entry(t).or_insert(off);
            *e = (*e).max(off);
        }
        m
    }

    /// PUTs acknowledged so far.
    pub fn acked_count(&self) -> u64 {
        self.acked.len() as u64
    }

    /// Entries delivered so far (redeliveries included).
    pub fn delivered_count(&self) -> u64 {
        self.delivered_total
    }

    /// A GET on `topic` returned `payload`: it must be exactly an entry some producer sent to
    /// that topic.
    pub fn delivered(&mut self, topic: usize, payload: &[u8]) -> Result<(), Violation> {
        let bad = |why: &str| Violation {
            checker: "no acknowledged entry lost or changed".into(),
            detail: format!(
                "GET on t{topic} returned {why}: {:?}",
                String::from_utf8_lossy(&payload[..payload.len().min(48)])
            ),
        };
        let header: Vec<&[u8]> = payload.splitn(4, |&b| b == b':').collect();
        let parse = |b: &[u8]| std::str::from_utf8(b).ok()?.parse::<u64>().ok();
        let (Some(t), Some(p), Some(s)) = (
            header.first().and_then(|b| parse(b)),
            header.get(1).and_then(|b| parse(b)),
            header.get(2).and_then(|b| parse(b)),
        ) else {
            return Err(bad("an entry no client wrote"));
        };
        if t != topic as u64 {
            return Err(bad("an entry of another topic"));
        }
        match self.sent.get(&(topic, p as usize, s)) {
            Some(sent) if sent.as_slice() == payload => {}
            Some(_) => return Err(bad("an entry whose bytes changed")),
            None => return Err(bad("an entry no client wrote")),
        }
        self.delivered
            .entry(topic)
            .or_default()
            .insert((p as usize, s));
        self.delivered_total += 1;
        Ok(())
    }

    /// The end-of-run verdict: every acknowledged PUT was delivered (the drain read every topic
    /// to its end, so a missing one is lost), and acknowledged offsets are unique per topic and
    /// increase with each producer's sequence.
    pub fn judge(&self) -> Result<(), Violation> {
        let mut missing: BTreeMap<usize, Vec<(usize, u64, u64)>> = BTreeMap::new();
        for &(t, p, s, off) in &self.acked {
            let seen = self.delivered.get(&t).is_some_and(|d| d.contains(&(p, s)));
            if !seen {
                missing.entry(t).or_default().push((p, s, off));
            }
        }
        for (t, lost) in missing {
            // Entries handed to GETs whose replies never arrived are excused, one per such GET.
            let excused = self.gets_in_doubt.get(&t).copied().unwrap_or(0);
            if lost.len() as u64 > excused {
                let (p, s, off) = lost[0];
                return Err(Violation {
                    checker: "no acknowledged entry lost or changed".into(),
                    detail: format!(
                        "{} acknowledged PUTs of t{t} were never returned by any GET (every topic                          was read to its end; {excused} GETs went unanswered), e.g. p{p} s{s} at                          offset {off}",
                        lost.len()
                    ),
                });
            }
        }
        let mut by_offset: HashMap<(usize, u64), (usize, u64)> = HashMap::new();
        let mut last_of: HashMap<(usize, usize), (u64, u64)> = HashMap::new();
        for &(t, p, s, off) in &self.acked {
            if let Some(other) = by_offset.insert((t, off), (p, s)) {
                return Err(Violation {
                    checker: "offsets gapless and monotonic per topic".into(),
                    detail: format!(
                        "offset {off} of t{t} was acknowledged twice: to p{} s{} and to p{p} s{s}",
                        other.0, other.1
                    ),
                });
            }
            if let Some(&(prev_s, prev_off)) = last_of.get(&(t, p)) {
                if prev_s < s && prev_off >= off {
                    return Err(Violation {
                        checker: "offsets gapless and monotonic per topic".into(),
                        detail: format!(
                            "p{p} on t{t}: s{prev_s} acknowledged at {prev_off}, the later s{s} \
                             at {off}"
                        ),
                    });
                }
            }
            last_of.insert((t, p), (s, off));
        }
        Ok(())
    }
}
