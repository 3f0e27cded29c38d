//! Capacity over time.
//!
//! A worker's bookings are intervals `[slot start − lead, slot end)` each using some
//! [`Capacity`]. Whether a new booking fits is a question about the **peak** use across the new
//! booking's window, not the use at this instant: a lab booked for tomorrow 09:00–11:00 must not
//! collide with one booked for 10:00–12:00, and must not be refused because of one that ends
//! tonight. [`CapacityTimeline::check`] answers it exactly.
//!
//! ## How the peak is computed
//!
//! Use is a step function that only rises at a booking's start, so its maximum over a window is
//! reached at the window start or at the start of a booking inside the window. Booking starts are
//! kept sorted (as Unix milliseconds, in an array of their own), and the timeline remembers its
//! longest booking, so the bookings that can overlap a window are one contiguous slice: its end is
//! a binary search over the starts, its beginning a short walk back. No booking there (the usual
//! case for most workers of a large fleet) or one booking is answered at once; more are swept with
//! a small inline set of "still active" bookings, falling back to a sorted event list past
//! eight concurrent bookings. A check allocates nothing in the usual cases and costs
//! tens of nanoseconds. [`CapacityTimeline::check_ms`] takes the window in milliseconds, for
//! callers that check one window against many timelines.
//!
//! Ports are not a time-sliced resource: they are allocated at placement and held until the
//! instance is terminated (ADR-004), so they live in [`crate::ports::PortAllocator`].

use chrono::{DateTime, Utc};

use crate::model::{Capacity, Dimension, TimeWindow};

/// Above this many bookings active at once inside one window the sweep switches from an inline
/// array to a heap-allocated event list. Typical workers hold a handful of bookings near any
/// window; a small buffer keeps the per-check set-up (it is zero-filled) cheap.
const INLINE_ACTIVE: usize = 8;

/// One booking of a worker's capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    /// The instance holding it.
    pub instance_id: String,
    /// When it holds the capacity.
    pub window: TimeWindow,
    /// What it holds.
    pub usage: Capacity,
}

/// Why a booking does not fit: the first dimension that would overflow, at its peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// The dimension that overflows.
    pub dimension: Dimension,
    /// What the booking needs in that dimension.
    pub needed: u32,
    /// What is free in that dimension at the busiest moment of the window.
    pub available: u32,
}

/// Hot data of one booking but its start (kept apart in `starts` for the binary searches): its
/// end as Unix milliseconds and its use, 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    to: i64,
    usage: [u32; 4],
}

/// The bookings of one worker over time, against its declared capacity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CapacityTimeline {
    declared: Capacity,
    /// Booking starts as Unix milliseconds, sorted; `starts[i]`, `spans[i]` and `ids[i]` are one
    /// booking.
    starts: Vec<i64>,
    spans: Vec<Span>,
    ids: Vec<String>,
    /// Length of the longest booking, to bound the search for overlaps.
    max_len: i64,
}

/// `t` as Unix milliseconds, the unit of [`CapacityTimeline::check_ms`].
#[inline]
pub fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl CapacityTimeline {
    /// An empty timeline for a worker that declares `declared`.
    pub fn new(declared: Capacity) -> Self {
        CapacityTimeline {
            declared,
            ..Default::default()
        }
    }

    /// The worker's declared capacity.
    pub fn declared(&self) -> Capacity {
        self.declared
    }

    /// Number of bookings.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// `true` when nothing is booked.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Adds a booking without checking that it fits.
    ///
    /// For loading what the store already holds (the store is authoritative, even when an
    /// operator shrank a template). New placements go through [`CapacityTimeline::try_book`].
    pub fn insert(&mut self, instance_id: impl Into<String>, window: TimeWindow, usage: Capacity) {
        let (from, to) = (millis(window.start), millis(window.end));
        let at = self.starts.partition_point(|&s| s <= from);
        self.starts.insert(at, from);
        self.spans.insert(
            at,
            Span {
                to,
                usage: usage.as_array(),
            },
        );
        self.ids.insert(at, instance_id.into());
        self.max_len = self.max_len.max(to - from);
    }

    /// Adds a booking if it fits across its whole window; returns the peak use after it.
    pub fn try_book(
        &mut self,
        instance_id: impl Into<String>,
        window: TimeWindow,
        usage: Capacity,
    ) -> Result<Capacity, Shortfall> {
        let peak = self.check(&usage, &window)?;
        self.insert(instance_id, window, usage);
        Ok(peak)
    }

    /// Removes the booking of `instance_id`, returning it.
    pub fn release(&mut self, instance_id: &str) -> Option<Booking> {
        let i = self.ids.iter().position(|id| id == instance_id)?;
        let from = self.starts.remove(i);
        let span = self.spans.remove(i);
        let id = self.ids.remove(i);
        if span.to - from == self.max_len {
            self.max_len = self
                .starts
                .iter()
                .zip(&self.spans)
                .map(|(from, s)| s.to - from)
                .max()
                .unwrap_or(0);
        }
        Some(booking(from, &span, id))
    }

    /// `true` when `instance_id` holds a booking here.
    pub fn contains(&self, instance_id: &str) -> bool {
        self.ids.iter().any(|id| id == instance_id)
    }

    /// Every booking, in order of start.
    pub fn bookings(&self) -> impl Iterator<Item = Booking> + '_ {
        self.starts
            .iter()
            .zip(&self.spans)
            .zip(&self.ids)
            .map(|((&from, s), id)| booking(from, s, id.clone()))
    }

    /// The bookings that share at least one instant with `window`, in order of start.
    pub fn overlapping(&self, window: &TimeWindow) -> impl Iterator<Item = Booking> + '_ {
        let (ws, we) = (millis(window.start), millis(window.end));
        let (lo, hi) = self.candidate_range(ws, we);
        self.starts[lo..hi]
            .iter()
            .zip(&self.spans[lo..hi])
            .zip(&self.ids[lo..hi])
            .filter(move |&((&from, s), _)| s.to > ws && from < we)
            .map(|((&from, s), id)| booking(from, s, id.clone()))
    }

    /// The earliest booking start at or after `t`, if any.
    pub fn next_start_at_or_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let t = millis(t);
        let i = self.starts.partition_point(|&s| s < t);
        self.starts.get(i).map(|&s| from_millis(s))
    }

    /// Use at one instant.
    pub fn usage_at(&self, t: DateTime<Utc>) -> Capacity {
        let t = millis(t);
        let (lo, hi) = self.candidate_range(t, t.saturating_add(1));
        let mut sum = [0u32; 4];
        for (&from, s) in self.starts[lo..hi].iter().zip(&self.spans[lo..hi]) {
            if from <= t && t < s.to {
                add_into(&mut sum, &s.usage);
            }
        }
        Capacity::from_array(sum)
    }

    /// Peak use in each dimension across `window` (each dimension's own maximum).
    pub fn peak(&self, window: &TimeWindow) -> Capacity {
        Capacity::from_array(self.peak_raw(millis(window.start), millis(window.end)))
    }

    /// Peak use over all time.
    pub fn peak_overall(&self) -> Capacity {
        Capacity::from_array(self.peak_raw(i64::MIN, i64::MAX))
    }

    /// Whether `demand` fits across all of `window`.
    ///
    /// `Ok` carries the peak use after adding it (what the bin-packing score looks at); `Err` the
    /// first dimension that would overflow. Same as [`CapacityTimeline::check_ms`] on the window
    /// in milliseconds.
    pub fn check(&self, demand: &Capacity, window: &TimeWindow) -> Result<Capacity, Shortfall> {
        self.check_ms(demand, millis(window.start), millis(window.end))
    }

    /// [`CapacityTimeline::check`] over `[start_ms, end_ms)` in Unix milliseconds ([`millis`]):
    /// for callers that check one window against many timelines and convert it once.
    #[inline(always)]
    pub fn check_ms(
        &self,
        demand: &Capacity,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Capacity, Shortfall> {
        let peak = self.peak_raw(start_ms, end_ms);
        let need = demand.as_array();
        let cap = self.declared.as_array();
        let after = [0, 1, 2, 3].map(|d| peak[d].saturating_add(need[d]));
        // One branch for the four dimensions; which one overflows only matters when one does.
        let over = (0..4).fold(false, |o, d| o | (after[d] > cap[d]));
        if over {
            return Err(shortfall(&peak, &need, &cap));
        }
        Ok(Capacity::from_array(after))
    }

    /// Shorthand for `check(..).is_ok()`.
    pub fn fits(&self, demand: &Capacity, window: &TimeWindow) -> bool {
        self.check(demand, window).is_ok()
    }

    /// Indices `[lo, hi)` of the bookings that may overlap `[ws, we)`: one starting at or after
    /// `we` begins after it; one starting before `ws − max_len` has ended before `ws`.
    ///
    /// `hi` is a binary search; `lo` is found walking back from `hi`, because only bookings
    /// that start within `max_len` before the window lie between them, and those are few (and
    /// the sweep visits each of them anyway).
    #[inline(always)]
    fn candidate_range(&self, ws: i64, we: i64) -> (usize, usize) {
        let hi = self.starts.partition_point(|&s| s < we);
        let earliest = ws.saturating_sub(self.max_len);
        let near = self.starts[..hi]
            .iter()
            .rev()
            .take_while(|&&s| s >= earliest)
            .count();
        (hi - near, hi)
    }

    #[inline(always)]
    fn peak_raw(&self, ws: i64, we: i64) -> [u32; 4] {
        if ws >= we {
            return [0; 4];
        }
        let (lo, hi) = self.candidate_range(ws, we);
        match hi - lo {
            // Nothing near the window: the common case on a large fleet.
            0 => [0; 4],
            // One booking near it: its use if it overlaps (it starts before `we`).
            1 => match self.spans.get(lo) {
                Some(s) if s.to > ws => s.usage,
                _ => [0; 4],
            },
            _ => sweep(&self.starts[lo..hi], &self.spans[lo..hi], ws, we),
        }
    }
}

/// The first dimension where `peak + need` exceeds `cap`, for [`CapacityTimeline::check_ms`].
#[cold]
#[inline(never)]
fn shortfall(peak: &[u32; 4], need: &[u32; 4], cap: &[u32; 4]) -> Shortfall {
    let d = (0..4)
        .find(|&d| peak[d].saturating_add(need[d]) > cap[d])
        .unwrap_or(0);
    Shortfall {
        dimension: Dimension::ALL[d],
        needed: need[d],
        available: cap[d].saturating_sub(peak[d]),
    }
}

fn booking(from: i64, s: &Span, instance_id: String) -> Booking {
    Booking {
        instance_id,
        window: TimeWindow::new(from_millis(from), from_millis(s.to)),
        usage: Capacity::from_array(s.usage),
    }
}

/// Peak use across `[ws, we)` of bookings sorted by start, none starting at or after `we`.
///
/// Sweeps in order of start. `active` holds the bookings covering the current point; before
/// adding booking i at point p = max(start_i, ws), those that ended by p are dropped.
#[inline(never)]
fn sweep(starts: &[i64], spans: &[Span], ws: i64, we: i64) -> [u32; 4] {
    let mut active = [(0i64, [0u32; 4]); INLINE_ACTIVE];
    let mut n_active = 0usize;
    let mut sum = [0u32; 4];
    let mut peak = [0u32; 4];
    for (&from, s) in starts.iter().zip(spans) {
        if s.to <= ws {
            continue;
        }
        let p = from.max(ws);
        let mut k = 0;
        while k < n_active {
            if active[k].0 <= p {
                sub_from(&mut sum, &active[k].1);
                n_active -= 1;
                active[k] = active[n_active];
            } else {
                k += 1;
            }
        }
        if n_active == INLINE_ACTIVE {
            return peak_by_events(starts, spans, ws, we);
        }
        active[n_active] = (s.to, s.usage);
        n_active += 1;
        add_into(&mut sum, &s.usage);
        for d in 0..4 {
            peak[d] = peak[d].max(sum[d]);
        }
    }
    peak
}

/// The general sweep, for windows with more than [`INLINE_ACTIVE`] concurrent bookings:
/// +usage at each start, −usage at each end, ends before starts at equal times.
fn peak_by_events(starts: &[i64], spans: &[Span], ws: i64, we: i64) -> [u32; 4] {
    let mut events: Vec<(i64, bool, [u32; 4])> = Vec::with_capacity(spans.len() * 2);
    for (&from, s) in starts.iter().zip(spans) {
        if s.to <= ws || from >= we {
            continue;
        }
        events.push((from.max(ws), true, s.usage));
        events.push((s.to, false, s.usage));
    }
    // `false` (end) sorts before `true` (start) at the same instant: half-open intervals.
    events.sort_unstable_by_key(|e| (e.0, e.1));
    let (mut sum, mut peak) = ([0u32; 4], [0u32; 4]);
    for (_, is_start, usage) in events {
        if is_start {
            add_into(&mut sum, &usage);
            for d in 0..4 {
                peak[d] = peak[d].max(sum[d]);
            }
        } else {
            sub_from(&mut sum, &usage);
        }
    }
    peak
}

#[inline]
fn add_into(sum: &mut [u32; 4], u: &[u32; 4]) {
    for d in 0..4 {
        sum[d] = sum[d].saturating_add(u[d]);
    }
}

#[inline]
fn sub_from(sum: &mut [u32; 4], u: &[u32; 4]) {
    for d in 0..4 {
        sum[d] = sum[d].saturating_sub(u[d]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use proptest::prelude::*;

    fn t(min: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default() + Duration::minutes(min)
    }

    fn w(a: i64, b: i64) -> TimeWindow {
        TimeWindow::new(t(a), t(b))
    }

    const WORKER: Capacity = Capacity::new(48, 192, 500, 20);

    #[test]
    fn disjoint_bookings_do_not_add_up() {
        let mut tl = CapacityTimeline::new(WORKER);
        tl.insert("a", w(0, 60), Capacity::new(40, 10, 10, 10));
        // 40 CPUs are used 0–60; 60–120 is free: half-open windows touch but do not overlap.
        assert!(tl.fits(&Capacity::new(40, 10, 10, 10), &w(60, 120)));
        assert!(!tl.fits(&Capacity::new(40, 10, 10, 10), &w(59, 120)));
    }

    #[test]
    fn peak_is_across_the_window_not_at_its_start() {
        let mut tl = CapacityTimeline::new(WORKER);
        tl.insert("late", w(90, 150), Capacity::new(30, 0, 0, 0));
        // At the window's start (0) nothing is used, but at 90 the window collides with "late".
        let err = tl
            .check(&Capacity::new(20, 0, 0, 0), &w(0, 120))
            .expect_err("must collide with the later booking");
        assert_eq!(
            err,
            Shortfall {
                dimension: Dimension::Cpu,
                needed: 20,
                available: 18
            }
        );
        assert_eq!(tl.peak(&w(0, 89)), Capacity::ZERO);
        assert_eq!(tl.peak(&w(0, 91)).cpu_cores, 30);
    }

    #[test]
    fn peak_counts_only_concurrent_bookings() {
        let mut tl = CapacityTimeline::new(WORKER);
        tl.insert("a", w(0, 30), Capacity::new(10, 0, 0, 0));
        tl.insert("b", w(20, 50), Capacity::new(10, 0, 0, 0));
        tl.insert("c", w(40, 70), Capacity::new(10, 0, 0, 0));
        // a∩b at 20–30 and b∩c at 40–50: never three at once.
        assert_eq!(tl.peak(&w(0, 100)).cpu_cores, 20);
        assert_eq!(tl.usage_at(t(45)).cpu_cores, 20);
        assert_eq!(tl.usage_at(t(35)).cpu_cores, 10);
        assert_eq!(tl.peak_overall().cpu_cores, 20);
    }

    #[test]
    fn each_dimension_is_checked_and_named() {
        let mut tl = CapacityTimeline::new(WORKER);
        tl.insert("a", w(0, 60), Capacity::new(0, 190, 0, 0));
        let e = tl
            .check(&Capacity::new(1, 4, 1, 1), &w(0, 60))
            .expect_err("memory overflows");
        assert_eq!(e.dimension, Dimension::Memory);
        tl.insert("b", w(0, 60), Capacity::new(0, 0, 0, 19));
        let e = tl
            .check(&Capacity::new(1, 1, 1, 2), &w(30, 90))
            .expect_err("nodes overflow");
        assert_eq!(e.dimension, Dimension::Nodes);
        assert_eq!(e.available, 1);
    }

    #[test]
    fn release_frees_the_interval_and_recomputes_the_longest() {
        let mut tl = CapacityTimeline::new(WORKER);
        tl.insert("long", w(0, 1000), Capacity::new(48, 0, 0, 0));
        tl.insert("short", w(2000, 2010), Capacity::new(1, 0, 0, 0));
        assert!(!tl.fits(&Capacity::new(1, 0, 0, 0), &w(500, 510)));
        let b = tl.release("long").expect("booked");
        assert_eq!(b.window, w(0, 1000));
        assert!(tl.release("long").is_none());
        assert!(tl.fits(&Capacity::new(48, 0, 0, 0), &w(500, 510)));
        assert_eq!(tl.max_len, 10 * 60_000);
        assert!(tl.contains("short") && !tl.contains("long"));
    }

    #[test]
    fn try_book_refuses_without_changing_anything() {
        let mut tl = CapacityTimeline::new(Capacity::new(4, 4, 4, 4));
        assert!(
            tl.try_book("a", w(0, 10), Capacity::new(3, 0, 0, 0))
                .is_ok()
        );
        assert!(
            tl.try_book("b", w(5, 15), Capacity::new(2, 0, 0, 0))
                .is_err()
        );
        assert_eq!(tl.len(), 1);
        assert_eq!(
            tl.try_book("c", w(10, 15), Capacity::new(4, 0, 0, 0)),
            Ok(Capacity::new(4, 0, 0, 0))
        );
    }

    #[test]
    fn overlapping_and_next_start_find_the_right_bookings() {
        let mut tl = CapacityTimeline::new(WORKER);
        tl.insert("a", w(0, 10), Capacity::ZERO);
        tl.insert("b", w(20, 30), Capacity::ZERO);
        tl.insert("c", w(40, 50), Capacity::ZERO);
        let ids: Vec<_> = tl.overlapping(&w(5, 25)).map(|b| b.instance_id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(tl.next_start_at_or_after(t(21)), Some(t(40)));
        assert_eq!(tl.next_start_at_or_after(t(41)), None);
        assert_eq!(tl.bookings().count(), 3);
    }

    #[test]
    fn many_concurrent_bookings_use_the_general_sweep() {
        let mut tl = CapacityTimeline::new(Capacity::new(1000, 1000, 1000, 1000));
        for i in 0..100 {
            tl.insert(format!("i{i}"), w(i, 200 + i), Capacity::new(1, 2, 3, 4));
        }
        assert_eq!(tl.peak(&w(0, 400)), Capacity::new(100, 200, 300, 400));
        assert_eq!(tl.peak(&w(250, 400)), Capacity::new(49, 98, 147, 196));
    }

    #[test]
    fn check_ms_is_check_in_milliseconds() {
        let mut tl = CapacityTimeline::new(Capacity::new(10, 10, 10, 10));
        tl.insert("a", w(0, 60), Capacity::new(6, 1, 1, 1));
        tl.insert("b", w(30, 90), Capacity::new(3, 1, 1, 1));
        let demand = Capacity::new(2, 2, 2, 2);
        for (a, b) in [
            (0, 10),
            (20, 40),
            (59, 61),
            (60, 120),
            (90, 100),
            (-50, 0),
            (10, 10),
        ] {
            let window = w(a, b);
            assert_eq!(
                tl.check_ms(&demand, millis(window.start), millis(window.end)),
                tl.check(&demand, &window),
                "{a}..{b}"
            );
        }
        // 6 + 3 at 30–60: 9 of 10 CPUs; an empty window holds nothing.
        assert_eq!(
            tl.check_ms(&demand, millis(t(30)), millis(t(40))),
            Err(Shortfall {
                dimension: Dimension::Cpu,
                needed: 2,
                available: 1
            })
        );
        assert_eq!(
            tl.check_ms(&demand, millis(t(40)), millis(t(40))),
            Ok(demand)
        );
        // A demand larger than the worker fails even where nothing is booked.
        assert_eq!(
            tl.check_ms(&Capacity::new(0, 0, 11, 0), millis(t(500)), millis(t(600)))
                .map_err(|s| s.dimension),
            Err(Dimension::Storage)
        );
    }

    #[test]
    fn a_single_nearby_booking_counts_only_if_it_overlaps() {
        let mut tl = CapacityTimeline::new(WORKER);
        tl.insert("long", w(0, 100), Capacity::new(1, 0, 0, 0));
        tl.insert("short", w(200, 210), Capacity::new(5, 0, 0, 0));
        // Only "short" is within max_len of the window start, and it ended at 210.
        assert_eq!(tl.peak(&w(210, 250)), Capacity::ZERO);
        assert_eq!(tl.peak(&w(205, 250)).cpu_cores, 5);
        // Windows before every booking, after every booking and between them.
        assert_eq!(tl.peak(&w(-100, 0)), Capacity::ZERO);
        assert_eq!(tl.peak(&w(300, 400)), Capacity::ZERO);
        assert_eq!(tl.peak(&w(100, 200)), Capacity::ZERO);
        assert_eq!(tl.peak(&w(99, 201)).cpu_cores, 5);
    }

    /// Reference: the use at every minute, by brute force.
    fn brute_peak(bookings: &[(i64, i64, u32)], ws: i64, we: i64) -> u32 {
        (ws..we)
            .map(|m| {
                bookings
                    .iter()
                    .filter(|(a, b, _)| *a <= m && m < *b)
                    .map(|(_, _, u)| *u)
                    .sum()
            })
            .max()
            .unwrap_or(0)
    }

    proptest! {
        #[test]
        fn peak_matches_brute_force(
            bookings in proptest::collection::vec((0i64..300, 1i64..120, 1u32..10), 0..60),
            ws in 0i64..400,
            len in 1i64..200,
        ) {
            let mut tl = CapacityTimeline::new(Capacity::new(u32::MAX, 0, 0, 0));
            let mut plain = Vec::new();
            for (i, (start, dur, cpu)) in bookings.iter().enumerate() {
                tl.insert(format!("b{i}"), w(*start, start + dur), Capacity::new(*cpu, 0, 0, 0));
                plain.push((*start, start + dur, *cpu));
            }
            prop_assert_eq!(tl.peak(&w(ws, ws + len)).cpu_cores, brute_peak(&plain, ws, ws + len));
            let demand = Capacity::new(7, 0, 0, 0);
            let window = w(ws, ws + len);
            prop_assert_eq!(
                tl.check_ms(&demand, millis(window.start), millis(window.end)),
                tl.check(&demand, &window)
            );
        }

        #[test]
        fn try_book_never_overcommits(
            requests in proptest::collection::vec((0i64..500, 1i64..180, 1u32..20), 1..80),
        ) {
            let cap = 32;
            let mut tl = CapacityTimeline::new(Capacity::new(cap, 0, 0, 0));
            let mut accepted = Vec::new();
            for (i, (start, dur, cpu)) in requests.iter().enumerate() {
                if tl.try_book(format!("r{i}"), w(*start, start + dur), Capacity::new(*cpu, 0, 0, 0)).is_ok() {
                    accepted.push((*start, start + dur, *cpu));
                }
            }
            prop_assert!(brute_peak(&accepted, 0, 700) <= cap);
        }
    }
}
