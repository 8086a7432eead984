//! The open day windows, laid out for the per-row path.
//!
//! Only a few days are open at once (the allowed lateness keeps two or three), so the
//! days are a short sorted list searched linearly. Within a day a battery's window is
//! found through a dense slot array indexed by battery (4 bytes per battery per open
//! day), and the windows themselves sit packed in the order they opened, so closing a
//! day is one sequential pass.
//!
//! Why not a hash map per day: two hash probes per row (screening, then merging the
//! partial) and moving each ~200-byte window on insert, rehash and drain were together
//! about half the window stage's time in profiles.

use std::collections::VecDeque;

use serde::de::Deserializer;
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use super::DayPartial;

const NO_WINDOW: u32 = u32::MAX;

/// One open UTC day: a window per battery that has reported on it.
#[derive(Debug, Clone, Default)]
pub struct OpenDay {
    day: i32,
    /// Battery index -> position in `windows`, or `NO_WINDOW`.
    slots: Vec<u32>,
    /// The battery of each window, parallel to `windows`.
    batteries: Vec<u32>,
    windows: Vec<DayPartial>,
}

impl OpenDay {
    pub fn day(&self) -> i32 {
        self.day
    }

    /// Windows opened on this day.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// The battery's window, opened if it has none yet. `fleet_size` sizes the slot
    /// array once for the whole fleet rather than growing it battery by battery.
    pub fn window(&mut self, battery: u32, fleet_size: usize) -> &mut DayPartial {
        let b = battery as usize;
        if b >= self.slots.len() {
            self.slots.resize(fleet_size.max(b + 1), NO_WINDOW);
        }
        let mut slot = self.slots[b];
        if slot == NO_WINDOW {
            if self.windows.len() == self.windows.capacity() {
                self.grow(fleet_size);
            }
            slot = self.windows.len() as u32;
            self.slots[b] = slot;
            self.batteries.push(battery);
            self.windows.push(DayPartial::default());
        }
        &mut self.windows[slot as usize]
    }

    /// Room for the rest of the fleet at once: nearly every battery reports every day,
    /// and doubling would leave up to half a day's windows allocated and unused.
    #[cold]
    fn grow(&mut self, fleet_size: usize) {
        let len = self.windows.len();
        let more = fleet_size.saturating_sub(len).max(len / 8).max(16);
        self.windows.reserve_exact(more);
        self.batteries.reserve_exact(more);
    }

    pub fn get_mut(&mut self, battery: u32) -> Option<&mut DayPartial> {
        let slot = *self.slots.get(battery as usize)?;
        self.windows.get_mut(slot as usize)
    }

    /// The batteries with a window, in the order the windows opened.
    pub fn batteries(&self) -> &[u32] {
        &self.batteries
    }

    /// (battery, window) in the order the windows opened.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u32, &DayPartial)> {
        self.batteries.iter().copied().zip(&self.windows)
    }
}

/// The open days, oldest first.
#[derive(Debug, Clone, Default)]
pub struct OpenWindows {
    /// A closed day is dropped, not kept for the next to reuse: a spare held a whole
    /// fleet's windows (17 MB at 100,000 batteries) resident between days to save one
    /// allocation a day, and a fleet-sized day is one large allocation, which the
    /// allocator maps fresh and returns whole.
    days: VecDeque<OpenDay>,
}

impl OpenWindows {
    /// The open day `day`, opened if needed.
    pub fn day_mut(&mut self, day: i32) -> &mut OpenDay {
        // Newest first: a live stream mostly writes the latest day.
        let at = match self.days.iter().rposition(|d| d.day <= day) {
            Some(i) if self.days[i].day == day => return &mut self.days[i],
            Some(i) => i + 1,
            None => 0,
        };
        self.days.insert(
            at,
            OpenDay {
                day,
                ..OpenDay::default()
            },
        );
        &mut self.days[at]
    }

    pub fn get_mut(&mut self, day: i32, battery: u32) -> Option<&mut DayPartial> {
        self.days
            .iter_mut()
            .rev()
            .find(|d| d.day == day)?
            .get_mut(battery)
    }

    pub fn first_day(&self) -> Option<i32> {
        self.days.front().map(|d| d.day)
    }

    pub fn last_day(&self) -> Option<i32> {
        self.days.back().map(|d| d.day)
    }

    /// Takes the oldest open day if it is before `day`.
    pub fn pop_before(&mut self, day: i32) -> Option<OpenDay> {
        if self.days.front()?.day >= day {
            return None;
        }
        self.days.pop_front()
    }

    /// Open windows over all days.
    pub fn windows(&self) -> usize {
        self.days.iter().map(OpenDay::len).sum()
    }

    pub fn days(&self) -> impl Iterator<Item = &OpenDay> {
        self.days.iter()
    }

    /// Bytes held.
    pub fn footprint(&self) -> usize {
        self.days
            .iter()
            .map(|d| {
                d.slots.capacity() * 4
                    + d.batteries.capacity() * 4
                    + d.windows.capacity() * std::mem::size_of::<DayPartial>()
            })
            .sum()
    }
}

/// Checkpointed as the windows themselves, (day, [(battery, window)]); slot arrays and
/// spare days are rebuilt.
impl Serialize for OpenWindows {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.days.iter().map(|d| (d.day, Windows(d))))
    }
}

struct Windows<'a>(&'a OpenDay);

impl Serialize for Windows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<'de> Deserialize<'de> for OpenWindows {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let days = Vec::<(i32, Vec<(u32, DayPartial)>)>::deserialize(d)?;
        let mut open = OpenWindows::default();
        for (day, windows) in days {
            let fleet = windows.iter().map(|(b, _)| *b as usize + 1).max();
            let open_day = open.day_mut(day);
            for (b, w) in windows {
                *open_day.window(b, fleet.unwrap_or(0)) = w;
            }
        }
        Ok(open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_stay_sorted_and_windows_are_found_again() {
        let mut open = OpenWindows::default();
        for (day, battery) in [(12, 3), (10, 1), (11, 2), (12, 0), (10, 3)] {
            open.day_mut(day).window(battery, 4).reports += 1;
        }
        let days: Vec<i32> = open.days().map(OpenDay::day).collect();
        assert_eq!(days, vec![10, 11, 12]);
        assert_eq!(open.windows(), 5);
        assert_eq!(open.get_mut(12, 3).map(|w| w.reports), Some(1));
        assert!(open.get_mut(12, 1).is_none());
        assert!(open.get_mut(9, 1).is_none());
        let order: Vec<u32> = open.days().last().unwrap().iter().map(|(b, _)| b).collect();
        assert_eq!(order, vec![3, 0], "windows keep the order they opened in");
    }

    #[test]
    fn a_day_opened_after_one_closed_starts_empty() {
        let mut open = OpenWindows::default();
        open.day_mut(10).window(5, 8).reports = 2;
        open.day_mut(11).window(1, 8).reports = 1;
        assert!(open.pop_before(10).is_none());
        let closed = open.pop_before(11).unwrap();
        assert_eq!(closed.day(), 10);
        drop(closed);
        let reused = open.day_mut(12);
        assert!(reused.is_empty());
        assert!(reused.get_mut(5).is_none());
        assert_eq!(reused.window(5, 8).reports, 0);
    }

    #[test]
    fn a_checkpoint_round_trip_keeps_every_window() {
        let mut open = OpenWindows::default();
        open.day_mut(10).window(7, 8).reports = 2;
        open.day_mut(10).window(2, 8).reports = 1;
        open.day_mut(11).window(7, 8).cycles = 0.5;
        let bytes = postcard::to_allocvec(&open).unwrap();
        let mut back: OpenWindows = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.windows(), 3);
        assert_eq!(back.get_mut(10, 7).map(|w| w.reports), Some(2));
        assert_eq!(back.get_mut(10, 2).map(|w| w.reports), Some(1));
        assert_eq!(back.get_mut(11, 7).map(|w| w.cycles), Some(0.5));
        let order: Vec<u32> = back.days().next().unwrap().iter().map(|(b, _)| b).collect();
        assert_eq!(order, vec![7, 2]);
    }
}
