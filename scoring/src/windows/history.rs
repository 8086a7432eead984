//! A battery's closed daily series, kept compact because there is one per battery and
//! fleets have hundreds of thousands.
//!
//! Layout: one ring buffer of 5-byte days (cycles and minutes as IEEE half floats, `u8`
//! trips with the imputed flag in bit 7), about 3.6 KB for 730 days. Half floats keep 11
//! significant bits (0.05%): a model of daily cycles whose day-to-day noise is a fifth of
//! the level cannot tell them from the exact values, and at 730 days the ring is most of
//! a battery's memory (8-byte days made 5.8 KB of the 14.9 KB per battery measured at
//! 100,000 x 730). The exact (`f64`) values of the most recent day are kept aside because
//! interpolation and lifetime build on them, the emitted closed days carry the exact
//! values, and their trailing means come from the newest 30 days' cycles kept as `f32`.
//!
//! One ring rather than one per field: a fleet's histories are far larger than the
//! caches, and closing a day then touches one cold place instead of three.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

const IMPUTED: u8 = 0x80;
const TRIPS_MAX: u8 = 0x7f;

/// A day's observed aggregate, as it closes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObservedDay {
    pub day: i32,
    pub cycles: f64,
    pub minutes: f64,
    pub trips: f64,
    pub age: i32,
    /// The largest lifetime the car reported that day (its end-of-day figure).
    pub reported_lifetime: f64,
}

/// One closed day as emitted: observed, or imputed by linear interpolation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClosedValues {
    pub day: i32,
    pub cycles: f64,
    pub minutes: f64,
    pub trips: f64,
    pub age: i32,
    /// Running sum of daily cycles, re-anchored to the car's figure on reported days.
    pub lifetime: f64,
    pub imputed: bool,
    /// Mean daily cycles over the 7 and 30 retained days ending with this one.
    pub mean_7d: f64,
    pub mean_30d: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatteryHistory {
    first_day: i32,
    #[serde(with = "fixed_width")]
    days: VecDeque<PackedDay>,
    last: Option<LastDay>,
    /// The newest days' cycles again, as `f32`: the trailing means read them for every
    /// day closed, and reading them off the ring (cold, a fleet's histories being far
    /// larger than the caches) was a fifth of the window stage's time. Checkpointed, since
    /// the ring's half floats could not rebuild the same means after a restart.
    recent: RecentCycles,
}

/// The newest [`RECENT`] days' cycles, newest at `next - 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RecentRecord")]
struct RecentCycles {
    cycles: [f32; RECENT],
    next: u8,
}

/// A checkpointed [`RecentCycles`], whose `next` is brought back into the ring (a
/// damaged checkpoint must not index past it).
#[derive(Deserialize)]
struct RecentRecord {
    cycles: [f32; RECENT],
    next: u8,
}

impl From<RecentRecord> for RecentCycles {
    fn from(r: RecentRecord) -> Self {
        Self {
            cycles: r.cycles,
            next: r.next % RECENT as u8,
        }
    }
}

const RECENT: usize = 30;

impl Default for RecentCycles {
    fn default() -> Self {
        Self {
            cycles: [0.0; RECENT],
            next: 0,
        }
    }
}

impl RecentCycles {
    fn push(&mut self, c: f32) {
        self.cycles[self.next as usize] = c;
        self.next = ((self.next as usize + 1) % RECENT) as u8;
    }

    /// Mean of the newest `n` (at most [`RECENT`]).
    fn mean(&self, n: usize) -> f64 {
        let n = n.min(RECENT);
        let next = self.next as usize;
        let sum = if n <= next {
            lane_sum(&self.cycles[next - n..next])
        } else {
            lane_sum(&self.cycles[RECENT - (n - next)..]) + lane_sum(&self.cycles[..next])
        };
        sum / n.max(1) as f64
    }
}

/// Sum in four independent lanes: one running sum made every closed day wait out 37
/// dependent additions, a visible share of closing.
fn lane_sum(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 4];
    let mut quads = values.chunks_exact(4);
    for q in &mut quads {
        for (lane, v) in lanes.iter_mut().zip(q) {
            *lane += f64::from(*v);
        }
    }
    let rest: f64 = quads.remainder().iter().map(|v| f64::from(*v)).sum();
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + rest
}

/// Days a ring has room for when it grows from `capacity`: a first small ring, then room
/// for the whole retention (plus the day pushed before the oldest goes) at once.
///
/// Why not double: a fleet's rings grow in step, and each growth frees the old buffer
/// between allocations that stay. Doubling to 730 days freed buffers of 8, 16, ... 512
/// days per battery through the heap, each too small for any later ring. A 16-day first
/// ring frees one 80-byte buffer, a size the allocator's small allocations reuse. A full
/// history is the same size either way (the retention plus one day). The cost: from its
/// 17th day a battery holds the whole ring, so an instance reaches its full-history
/// memory within weeks rather than creeping up to it over two years.
fn ring_capacity(capacity: usize, retention: usize) -> usize {
    let full = retention.max(1) + 1;
    if capacity < FIRST_RING_DAYS {
        FIRST_RING_DAYS.min(full)
    } else {
        full
    }
}

/// A young battery's ring: small, so that a fleet seen for a few days stays small.
const FIRST_RING_DAYS: usize = 16;

/// Packed days as one sequence of their bytes, not a sequence of sequences: postcard
/// writes a length and then the bytes, as it would a byte string.
mod fixed_width {
    use std::collections::VecDeque;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::PackedDay;

    pub fn serialize<S: Serializer>(days: &VecDeque<PackedDay>, s: S) -> Result<S::Ok, S::Error> {
        let (a, b) = days.as_slices();
        s.collect_seq(a.as_flattened().iter().chain(b.as_flattened()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VecDeque<PackedDay>, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        let (days, rest) = bytes.as_chunks::<5>();
        if !rest.is_empty() {
            return Err(serde::de::Error::invalid_length(
                bytes.len(),
                &"a whole number of 5-byte days",
            ));
        }
        // Room for the next day: a full history then never grows again (growing would
        // free this buffer into a hole of the heap, for every battery restored).
        let mut ring = VecDeque::with_capacity(days.len() + 1);
        ring.extend(days.iter().copied());
        Ok(ring)
    }
}

/// IEEE half float, the type arrow's `Float16` columns hold (the `half` crate's `f16`,
/// named through arrow so the build keeps the one copy arrow brings).
type Half = <datafusion::arrow::datatypes::Float16Type as datafusion::arrow::datatypes::ArrowPrimitiveType>::Native;

/// Bytes 0-1 cycles, 2-3 minutes (half floats, little-endian), 4 trips | imputed flag.
type PackedDay = [u8; 5];

/// Rounded to the nearest half float; beyond the largest (65,504, far past any day's
/// cycles or minutes) it saturates rather than become infinite in a model's input.
pub(crate) fn half_bytes(v: f64) -> [u8; 2] {
    Half::from_f64(v).min(Half::MAX).to_le_bytes()
}

pub(crate) fn half_value(b: [u8; 2]) -> f32 {
    Half::from_le_bytes(b).to_f32()
}

/// The whole trips a history keeps of a day (what a model needs), up to 127.
fn whole_trips(trips: f64) -> u8 {
    trips.round().clamp(0.0, f64::from(TRIPS_MAX)) as u8
}

fn pack(cycles: f64, minutes: f64, trips: u8) -> PackedDay {
    let (c, m) = (half_bytes(cycles), half_bytes(minutes));
    [c[0], c[1], m[0], m[1], trips]
}

fn cycles_of(d: &PackedDay) -> f32 {
    half_value([d[0], d[1]])
}

fn minutes_of(d: &PackedDay) -> f32 {
    half_value([d[2], d[3]])
}

fn trips_of(d: &PackedDay) -> u8 {
    d[4]
}

/// Days as a history keeps them (5 bytes each), read as cycles, minutes and trips.
///
/// Why an assessment carries its recent days packed: the alert store keeps the latest
/// assessment of every battery for the API, and 30 days as `[f32; 3]` were 360 bytes a
/// battery where these are 150, with the same values (they come from the half floats).
/// Serialized as `[cycles, minutes, trips]` triples, as the days were before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackedDays(Box<[PackedDay]>);

impl PackedDays {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Cycles, minutes, trips of each day, oldest first.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = [f32; 3]> + '_ {
        self.0.iter().map(unpack)
    }

    pub fn last(&self) -> Option<[f32; 3]> {
        self.0.last().map(unpack)
    }
}

fn unpack(d: &PackedDay) -> [f32; 3] {
    [
        cycles_of(d),
        minutes_of(d),
        f32::from(trips_of(d) & TRIPS_MAX),
    ]
}

/// Packed as the history packs a day: half floats, whole trips up to 127.
impl FromIterator<[f32; 3]> for PackedDays {
    fn from_iter<I: IntoIterator<Item = [f32; 3]>>(days: I) -> Self {
        Self(
            days.into_iter()
                .map(|[c, m, t]| pack(f64::from(c), f64::from(m), whole_trips(f64::from(t))))
                .collect(),
        )
    }
}

impl Serialize for PackedDays {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for PackedDays {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<[f32; 3]>::deserialize(d)?.into_iter().collect())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct LastDay {
    day: i32,
    cycles: f64,
    minutes: f64,
    trips: f64,
    age: i32,
    lifetime: f64,
}

impl BatteryHistory {
    /// Appends a closed day, first filling any gap since the previous closed day by linear
    /// interpolation; returns the filled days and the day itself, in order. A day at or
    /// before the last closed one is ignored (the window stage never sends one).
    pub fn close_day(&mut self, obs: ObservedDay, retention: usize, out: &mut Vec<ClosedValues>) {
        if let Some(last) = self.last {
            if obs.day <= last.day {
                return;
            }
            let steps = (obs.day - last.day) as f64;
            let mut lifetime = last.lifetime;
            for k in 1..(obs.day - last.day) {
                let f = k as f64 / steps;
                let cycles = last.cycles + (obs.cycles - last.cycles) * f;
                lifetime += cycles;
                let mut v = ClosedValues {
                    day: last.day + k,
                    cycles,
                    minutes: last.minutes + (obs.minutes - last.minutes) * f,
                    trips: last.trips + (obs.trips - last.trips) * f,
                    age: last.age + k,
                    lifetime,
                    imputed: true,
                    mean_7d: 0.0,
                    mean_30d: 0.0,
                };
                self.push(&mut v, retention);
                out.push(v);
            }
        }
        let mut v = ClosedValues {
            day: obs.day,
            cycles: obs.cycles,
            minutes: obs.minutes,
            trips: obs.trips,
            age: obs.age,
            lifetime: obs.reported_lifetime,
            imputed: false,
            mean_7d: 0.0,
            mean_30d: 0.0,
        };
        self.push(&mut v, retention);
        out.push(v);
    }

    /// Appends `v` and fills in its trailing means.
    fn push(&mut self, v: &mut ClosedValues, retention: usize) {
        if self.days.is_empty() {
            self.first_day = v.day;
        }
        if self.days.len() == self.days.capacity() {
            // At least one more: a restored ring may be longer than a retention since
            // lowered, and trims to it only after this push.
            let len = self.days.len();
            self.days
                .reserve_exact(ring_capacity(self.days.capacity(), retention).max(len + 1) - len);
        }
        // The history keeps whole trips a day (what a model needs); the closed-day row
        // keeps the exact sum.
        let trips = whole_trips(v.trips);
        let flagged = if v.imputed { trips | IMPUTED } else { trips };
        self.days.push_back(pack(v.cycles, v.minutes, flagged));
        while self.days.len() > retention.max(1) {
            self.days.pop_front();
            self.first_day += 1;
        }
        self.recent.push(v.cycles as f32);
        v.mean_7d = self.recent.mean(7.min(self.days.len()));
        v.mean_30d = self.recent.mean(30.min(self.days.len()));
        self.last = Some(LastDay {
            day: v.day,
            cycles: v.cycles,
            minutes: v.minutes,
            trips: v.trips,
            age: v.age,
            lifetime: v.lifetime,
        });
    }

    pub fn len(&self) -> usize {
        self.days.len()
    }

    /// Starts loading the newest day's cache line, where the next day goes.
    pub(super) fn prefetch_newest(&self) {
        if let Some(d) = self.days.back() {
            super::shard::prefetch(d);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.days.is_empty()
    }

    pub fn last_day(&self) -> Option<i32> {
        self.last.map(|l| l.day)
    }

    pub fn lifetime(&self) -> Option<f64> {
        self.last.map(|l| l.lifetime)
    }

    pub fn last_age(&self) -> Option<i32> {
        self.last.map(|l| l.age)
    }

    /// Daily cycles, oldest first, with their day numbers.
    pub fn cycles(&self) -> impl ExactSizeIterator<Item = (i32, f32)> + '_ {
        self.days
            .iter()
            .enumerate()
            .map(|(i, d)| (self.first_day + i as i32, cycles_of(d)))
    }

    /// (day, cycles, minutes, trips, imputed) of every retained day, oldest first.
    pub fn days(&self) -> impl Iterator<Item = (i32, f32, f32, u8, bool)> + '_ {
        self.days.iter().enumerate().map(|(i, d)| {
            let t = trips_of(d);
            (
                self.first_day + i as i32,
                cycles_of(d),
                minutes_of(d),
                t & TRIPS_MAX,
                t & IMPUTED != 0,
            )
        })
    }

    /// The `n` days ending with `day` (fewer when the history is shorter), oldest first,
    /// as cycles, minutes and trips: what a model of this battery is fitted on.
    pub fn window_through(
        &self,
        day: i32,
        n: usize,
    ) -> impl ExactSizeIterator<Item = [f32; 3]> + '_ {
        let end = self.len_through(day);
        let start = end.saturating_sub(n);
        self.days.range(start..end).map(unpack)
    }

    /// The same days as [`Self::window_through`], still packed: what an assessment carries
    /// for the API without widening them.
    pub fn packed_through(&self, day: i32, n: usize) -> PackedDays {
        let end = self.len_through(day);
        let start = end.saturating_sub(n);
        PackedDays(self.days.range(start..end).copied().collect())
    }

    /// Retained days up to and including `day`: the history a decision on that day sees,
    /// however many later days the same batch has closed since.
    pub fn len_through(&self, day: i32) -> usize {
        ((day - self.first_day + 1).max(0) as usize).min(self.days.len())
    }

    /// Bytes this history occupies, heap included.
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Self>() + self.days.capacity() * std::mem::size_of::<PackedDay>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assessments_packed_days_are_the_historys_days_and_serialize_as_triples() {
        let mut h = BatteryHistory::default();
        let mut out = Vec::new();
        for day in 0..40 {
            let mut o = obs(day, 0.1 + f64::from(day) * 0.01, 0.0);
            o.trips = f64::from(day % 9);
            h.close_day(o, 730, &mut out);
        }
        let packed = h.packed_through(35, 30);
        let wide: Vec<[f32; 3]> = h.window_through(35, 30).collect();
        assert_eq!(packed.len(), 30);
        assert_eq!(packed.iter().collect::<Vec<_>>(), wide);
        assert_eq!(packed.last(), wide.last().copied());
        let json = serde_json::to_string(&packed).unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<[f32; 3]>>(&json).unwrap(),
            wide,
            "serialized as [cycles, minutes, trips] per day"
        );
        let back: PackedDays = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back, packed,
            "reading the triples back packs the same bytes"
        );
        assert!(PackedDays::default().is_empty());
    }

    fn obs(day: i32, cycles: f64, lifetime: f64) -> ObservedDay {
        ObservedDay {
            day,
            cycles,
            minutes: cycles * 400.0,
            trips: 4.0,
            age: day,
            reported_lifetime: lifetime,
        }
    }

    #[test]
    fn a_three_day_gap_interpolates_linearly_and_lifetime_runs_on() {
        let mut h = BatteryHistory::default();
        let mut out = Vec::new();
        h.close_day(obs(10, 0.2, 5.0), 730, &mut out);
        h.close_day(obs(14, 0.6, 6.2), 730, &mut out);
        let got: Vec<(i32, f64, bool)> = out
            .iter()
            .map(|v| (v.day, (v.cycles * 1e9).round() / 1e9, v.imputed))
            .collect();
        assert_eq!(
            got,
            vec![
                (10, 0.2, false),
                (11, 0.3, true),
                (12, 0.4, true),
                (13, 0.5, true),
                (14, 0.6, false)
            ]
        );
        // Lifetime: 5.0, then the running sum over imputed days, re-anchored on day 14.
        let lifetimes: Vec<f64> = out
            .iter()
            .map(|v| (v.lifetime * 1e9).round() / 1e9)
            .collect();
        assert_eq!(lifetimes, vec![5.0, 5.3, 5.7, 6.2, 6.2]);
        assert_eq!(out[2].minutes.round(), 160.0);
        assert_eq!(out[2].age, 12);
        assert_eq!(h.days().filter(|d| d.4).count(), 3);
    }

    #[test]
    fn retention_bounds_the_history_and_footprint_stays_under_4_kb() {
        let mut h = BatteryHistory::default();
        let mut out = Vec::new();
        for d in 0..1000 {
            h.close_day(obs(d, 0.15, d as f64 * 0.15), 730, &mut out);
        }
        assert_eq!(h.len(), 730);
        assert_eq!(h.cycles().next().unwrap().0, 270);
        assert!(h.footprint() <= 4 * 1024, "{} bytes", h.footprint());
    }

    #[test]
    fn a_ring_grows_twice_to_the_retention_and_a_restored_one_not_again() {
        let mut h = BatteryHistory::default();
        let mut out = Vec::new();
        let mut capacities = vec![h.days.capacity()];
        for d in 0..800 {
            h.close_day(obs(d, 0.15, d as f64 * 0.15), 730, &mut out);
            if capacities.last() != Some(&h.days.capacity()) {
                capacities.push(h.days.capacity());
            }
        }
        // Each growth frees a buffer into the heap: two small ones, not ten.
        assert_eq!(capacities, vec![0, FIRST_RING_DAYS, 731]);

        let bytes = postcard::to_allocvec(&h).unwrap();
        let mut restored: BatteryHistory = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(restored, h);
        let capacity = restored.days.capacity();
        restored.close_day(obs(800, 0.15, 120.0), 730, &mut out);
        assert_eq!(restored.days.capacity(), capacity);
        assert_eq!(restored.len(), 730);

        // A ring restored under a lower retention still takes the day, then trims.
        let mut shorter: BatteryHistory = postcard::from_bytes(&bytes).unwrap();
        for d in 800..803 {
            shorter.close_day(obs(d, 0.15, 120.0), 365, &mut out);
        }
        assert_eq!(shorter.len(), 365);
    }

    #[test]
    fn emitted_means_are_the_means_of_the_newest_days_closed() {
        let mut h = BatteryHistory::default();
        let (mut out, mut closed) = (Vec::new(), Vec::new());
        // Gaps (interpolated days) and 200 days through a 40-day ring: the newest-days
        // copy wraps many times, and the means must not see the ring's half floats.
        for d in (0..200).filter(|d| d % 9 != 4) {
            out.clear();
            h.close_day(obs(d, 0.1 + (d % 13) as f64 * 0.0123, 0.0), 40, &mut out);
            for v in &out {
                closed.push(f64::from(v.cycles as f32));
                for (n, got) in [(7, v.mean_7d), (30, v.mean_30d)] {
                    let newest = &closed[closed.len().saturating_sub(n)..];
                    let want = newest.iter().sum::<f64>() / newest.len() as f64;
                    assert!((got - want).abs() < 1e-12, "day {}: {got} != {want}", v.day);
                }
            }
        }
        // A checkpointed history goes on with the same means and the same days.
        let mut back: BatteryHistory =
            postcard::from_bytes(&postcard::to_allocvec(&h).unwrap()).unwrap();
        assert_eq!(back, h);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        h.close_day(obs(300, 0.3, 0.0), 40, &mut a);
        back.close_day(obs(300, 0.3, 0.0), 40, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn a_packed_day_keeps_trips_and_cycles_and_minutes_to_eleven_bits() {
        for (cycles, minutes, trips) in [
            (0.0, 0.0, 0u8),
            (1.234_567, 1439.99, 127),
            (3.5, 406.45, 3 | IMPUTED),
            (1e-3, 0.013, 1),
            (250.0, 9_876.54, 0),
        ] {
            let d = pack(cycles, minutes, trips);
            assert_eq!(trips_of(&d), trips);
            for (exact, back) in [(cycles, cycles_of(&d)), (minutes, minutes_of(&d))] {
                let back = f64::from(back);
                assert!(
                    (back - exact).abs() <= exact * 2f64.powi(-11),
                    "{exact} came back as {back}"
                );
            }
        }
        // Past the largest half float: the largest, not infinity.
        assert_eq!(minutes_of(&pack(1.0, 1e6, 0)), 65_504.0);
    }

    #[test]
    fn a_damaged_ring_position_is_brought_back_into_the_ring() {
        #[derive(Serialize)]
        struct Damaged {
            cycles: [f32; RECENT],
            next: u8,
        }
        let bytes = postcard::to_allocvec(&Damaged {
            cycles: [1.0; RECENT],
            next: 200,
        })
        .unwrap();
        let mut recent: RecentCycles = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(recent.next, 200 % RECENT as u8);
        recent.push(4.0);
        assert_eq!(recent.mean(1), 4.0);
        assert_eq!(recent.mean(30), (29.0 + 4.0) / 30.0);
    }

    #[test]
    fn older_days_are_ignored() {
        let mut h = BatteryHistory::default();
        let mut out = Vec::new();
        h.close_day(obs(10, 0.2, 5.0), 730, &mut out);
        h.close_day(obs(9, 0.2, 5.0), 730, &mut out);
        assert_eq!(out.len(), 1);
    }
}
