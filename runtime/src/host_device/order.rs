//! Stream order, checked: every device-memory access of a host-device job is checked against
//! the other stream's accesses of the same bytes, so a missing event wait fails the run on every
//! execution, whatever the timing (random delays only make a hazard *show* in the results
//! sometimes; this makes it an error always).
//!
//! The order is the one CUDA guarantees: jobs of one stream run in issue order; a stream that
//! waits for an event runs after everything issued to the recording stream before the record;
//! work issued after the host waited for an event (or synchronized) runs after what the wait
//! covered. Each is a vector clock (one component per stream) kept at issue time ([`Issue`]).
//! At run time each byte range remembers its last write and, per stream, its last read
//! ([`Shadow`]); an access must be ordered after every conflicting access of the other stream
//! it meets there (a read after the last write, a write after the last write and every read).
//! Whichever of two unordered accesses runs second reports the pair, so the check does not
//! depend on which one the threads happen to run first.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::ops::Range;

use crate::device::Stream;

/// Streams of the host device: compute and copy.
const STREAMS: usize = 2;

/// A vector clock: per stream, how many of its jobs are ordered before.
pub(super) type Clock = [u64; STREAMS];

fn index(s: Stream) -> usize {
    match s {
        Stream::Compute => 0,
        Stream::Copy => 1,
    }
}

fn name(i: usize) -> &'static str {
    ["compute", "copy"][i]
}

fn join(into: &mut Clock, other: &Clock) {
    for (a, b) in into.iter_mut().zip(other) {
        *a = (*a).max(*b);
    }
}

/// A job's place in the order: its stream and the clock of what is ordered before it (its own
/// component is its number on the stream).
#[derive(Clone, Copy, Debug)]
pub(super) struct JobClock {
    stream: usize,
    clock: Clock,
}

/// The issuing side's clocks: each stream's, each event's (as of its last record) and the
/// host's (what its waits covered).
#[derive(Default)]
pub(super) struct Issue {
    streams: [Clock; STREAMS],
    events: Vec<Clock>,
    host: Clock,
}

impl Issue {
    /// The clock of a job issued now to `s`.
    pub(super) fn job(&mut self, s: Stream) -> JobClock {
        let i = index(s);
        let c = &mut self.streams[i];
        join(c, &self.host);
        c[i] += 1;
        JobClock {
            stream: i,
            clock: *c,
        }
    }

    /// Event `e` recorded on `s` now: it covers everything issued to `s` so far.
    pub(super) fn record(&mut self, s: Stream, e: usize) {
        if self.events.len() <= e {
            self.events.resize(e + 1, Clock::default());
        }
        self.events[e] = self.streams[index(s)];
    }

    /// `s` waits for event `e` (as of its last record).
    pub(super) fn wait(&mut self, s: Stream, e: usize) {
        if let Some(ev) = self.events.get(e).copied() {
            join(&mut self.streams[index(s)], &ev);
        }
    }

    /// The host waited for event `e`.
    pub(super) fn host_wait(&mut self, e: usize) {
        if let Some(ev) = self.events.get(e).copied() {
            join(&mut self.host, &ev);
        }
    }

    /// The host waited for everything issued so far.
    pub(super) fn host_sync(&mut self) {
        for c in self.streams {
            join(&mut self.host, &c);
        }
    }
}

/// What a byte range last saw: the last write (stream, its number there) and the last read by
/// each stream (0: none since that write).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seg {
    end: usize,
    write: Option<(usize, u64)>,
    reads: Clock,
}

/// Per region, its byte ranges' last accesses (see the module notes).
#[derive(Default)]
pub(super) struct Shadow {
    regions: HashMap<usize, BTreeMap<usize, Seg>>,
}

impl Shadow {
    /// Checks and records an access of `range` in region `region` by `job`: an error names the
    /// two accesses that no event orders.
    pub(super) fn access(
        &mut self,
        region: usize,
        range: Range<usize>,
        write: bool,
        job: &JobClock,
    ) -> Result<(), String> {
        if range.is_empty() {
            return Ok(());
        }
        let map = self.regions.entry(region).or_default();
        split(map, range.start);
        split(map, range.end);
        // Fill the gaps with fresh ranges, so every byte of `range` is one entry.
        let mut cursor = range.start;
        let starts: Vec<(usize, usize)> = map
            .range(range.clone())
            .map(|(&s, seg)| (s, seg.end))
            .collect();
        for (s, end) in starts {
            if s > cursor {
                map.insert(
                    cursor,
                    Seg {
                        end: s,
                        ..Seg::default()
                    },
                );
            }
            cursor = end;
        }
        if cursor < range.end {
            map.insert(
                cursor,
                Seg {
                    end: range.end,
                    ..Seg::default()
                },
            );
        }
        let me = job.stream;
        let what = if write { "write" } else { "read" };
        for (&start, seg) in map.range_mut(range.clone()) {
            if let Some((ws, wn)) = seg.write {
                if ws != me && job.clock[ws] < wn {
                    return Err(format!(
                        "{} stream {what} of bytes {start:#x}..{:#x} (its job {}) is not ordered \
                         after the {} stream's write of them (its job {wn}): an event wait is \
                         missing",
                        name(me),
                        seg.end,
                        job.clock[me],
                        name(ws),
                    ));
                }
            }
            if write {
                for (r, &rn) in seg.reads.iter().enumerate() {
                    if r != me && rn > job.clock[r] {
                        return Err(format!(
                            "{} stream write of bytes {start:#x}..{:#x} (its job {}) is not \
                             ordered after the {} stream's read of them (its job {rn}): an \
                             event wait is missing",
                            name(me),
                            seg.end,
                            job.clock[me],
                            name(r),
                        ));
                    }
                }
                seg.write = Some((me, job.clock[me]));
                seg.reads = Clock::default();
            } else {
                seg.reads[me] = seg.reads[me].max(job.clock[me]);
            }
        }
        merge(map, range);
        Ok(())
    }

    /// A region destroyed: its memory is gone, and so is its history.
    pub(super) fn forget(&mut self, region: usize) {
        self.regions.remove(&region);
    }
}

/// Splits the entry holding `at` (if it starts before it) in two at `at`.
fn split(map: &mut BTreeMap<usize, Seg>, at: usize) {
    let Some((&s, seg)) = map.range_mut(..at).next_back() else {
        return;
    };
    if seg.end > at {
        let tail = Seg {
            end: seg.end,
            ..*seg
        };
        seg.end = at;
        debug_assert!(s < at);
        map.insert(at, tail);
    }
}

/// Joins neighbouring entries with the same history in and around `range` (keeps the map as
/// small as the distinct histories).
fn merge(map: &mut BTreeMap<usize, Seg>, range: Range<usize>) {
    let lo = map
        .range(..range.start)
        .next_back()
        .map_or(range.start, |(&s, _)| s);
    let keys: Vec<usize> = map.range(lo..=range.end).map(|(&s, _)| s).collect();
    let mut prev: Option<usize> = None;
    for k in keys {
        if let Some(p) = prev {
            let (a, b) = (map[&p], map[&k]);
            if a.end == k && a.write == b.write && a.reads == b.reads {
                map.remove(&k);
                map.get_mut(&p).expect("present").end = b.end;
                continue;
            }
        }
        prev = Some(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue() -> Issue {
        Issue::default()
    }

    #[test]
    fn a_read_waiting_for_the_copy_is_ordered() {
        let (mut is, mut sh) = (issue(), Shadow::default());
        let w = is.job(Stream::Copy);
        is.record(Stream::Copy, 0);
        is.wait(Stream::Compute, 0);
        let r = is.job(Stream::Compute);
        // Either run order: the wait makes the read run second on a device.
        sh.access(1, 0..64, true, &w).unwrap();
        sh.access(1, 16..32, false, &r).unwrap();
    }

    #[test]
    fn a_read_without_the_wait_is_reported_in_either_run_order() {
        for read_first in [false, true] {
            let (mut is, mut sh) = (issue(), Shadow::default());
            let w = is.job(Stream::Copy);
            let r = is.job(Stream::Compute);
            let res = if read_first {
                sh.access(1, 16..32, false, &r).unwrap();
                sh.access(1, 0..64, true, &w)
            } else {
                sh.access(1, 0..64, true, &w).unwrap();
                sh.access(1, 16..32, false, &r)
            };
            let e = res.unwrap_err();
            assert!(e.contains("event wait is missing"), "{e}");
            assert!(e.contains("0x10..0x20"), "{e}");
        }
    }

    #[test]
    fn a_slot_rewritten_before_its_reader_finished_is_reported() {
        // The ring pattern: copy fills, compute reads (after a wait), copy refills the slot —
        // which must wait for the compute stream's read.
        for with_wait in [true, false] {
            let (mut is, mut sh) = (issue(), Shadow::default());
            let fill = is.job(Stream::Copy);
            is.record(Stream::Copy, 0);
            is.wait(Stream::Compute, 0);
            let read = is.job(Stream::Compute);
            is.record(Stream::Compute, 1);
            if with_wait {
                is.wait(Stream::Copy, 1);
            }
            let refill = is.job(Stream::Copy);
            sh.access(2, 0..100, true, &fill).unwrap();
            sh.access(2, 0..100, false, &read).unwrap();
            let res = sh.access(2, 50..150, true, &refill);
            assert_eq!(res.is_ok(), with_wait, "{res:?}");
        }
    }

    #[test]
    fn host_synchronization_orders_later_work() {
        let (mut is, mut sh) = (issue(), Shadow::default());
        let w = is.job(Stream::Copy);
        is.host_sync();
        let r = is.job(Stream::Compute);
        sh.access(3, 0..8, true, &w).unwrap();
        sh.access(3, 0..8, false, &r).unwrap();
        // A host wait for an event covers what the event covers, and no more.
        let w2 = is.job(Stream::Copy);
        is.record(Stream::Copy, 4);
        let w3 = is.job(Stream::Copy);
        is.host_wait(4);
        let r2 = is.job(Stream::Compute);
        sh.access(3, 16..24, true, &w2).unwrap();
        sh.access(3, 24..32, true, &w3).unwrap();
        sh.access(3, 16..24, false, &r2).unwrap();
        assert!(sh.access(3, 24..32, false, &r2).is_err());
        // The first read is not ordered before a later copy-stream write without another wait.
        assert!(sh.access(3, 0..8, true, &w3).is_err());
    }

    #[test]
    fn ranges_split_and_merge_back() {
        let (mut is, mut sh) = (issue(), Shadow::default());
        let a = is.job(Stream::Compute);
        for i in 0..100 {
            sh.access(5, i * 10..i * 10 + 10, true, &a).unwrap();
        }
        assert_eq!(sh.regions[&5].len(), 1, "one history, one entry");
        let b = is.job(Stream::Copy);
        // Unordered with `a`, but on bytes `a` never touched.
        sh.access(5, 1000..1100, true, &b).unwrap();
        assert!(sh.access(5, 995..1005, true, &b).is_err());
        sh.forget(5);
        sh.access(5, 0..2000, true, &b).unwrap();
    }
}
