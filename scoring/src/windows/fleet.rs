//! Battery ids interned to dense indexes, with what the stage keeps per battery.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use hashbrown::HashTable;
use serde::{Deserialize, Serialize};

use super::history::BatteryHistory;
use super::shard::id_hash;

/// Battery ids interned to dense indexes, with their histories.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(from = "FleetRecord")]
pub struct Fleet {
    /// Battery indexes by [`id_hash`]; ids are compared in `packed_ids`. One lookup runs
    /// per row: 4-byte entries keep the table in cache (half a megabyte for 100,000
    /// batteries, where a table of the ids themselves took 4 MB and missed), and the
    /// hash is the one the shard route already took.
    #[serde(skip)]
    index: HashTable<u32>,
    pub ids: Vec<Arc<str>>,
    pub vehicles: Vec<Option<Arc<str>>>,
    /// A hash of each battery's vehicle id: a car reports its vehicle with every row,
    /// and comparing a dense hash spares the cache miss of reading the stored id.
    #[serde(skip)]
    vehicle_hashes: Vec<u64>,
    /// Ids and vehicles again, packed: every closed day copies both into its batch, and
    /// reading them from 100,000 separate allocations missed the cache each time.
    #[serde(skip)]
    packed_ids: PackedStrings,
    #[serde(skip)]
    packed_vehicles: PackedStrings,
    pub rated: Vec<f64>,
    pub histories: Vec<BatteryHistory>,
    /// Slots of evicted batteries (their id is empty), lowest reused first: an order the
    /// ids alone decide, so a fleet restored from a checkpoint gives the next new battery
    /// the slot the running one would have.
    #[serde(skip)]
    free: BinaryHeap<Reverse<u32>>,
}

/// Strings by index, in one buffer. A replaced string is appended anew (vehicles change
/// rarely, so the bytes it leaves behind stay few).
#[derive(Debug, Default, Clone)]
struct PackedStrings {
    bytes: String,
    /// (start, len) by index; len `u32::MAX` is no string.
    spans: Vec<(u32, u32)>,
}

impl PackedStrings {
    /// Bytes no string points at any more (replaced or evicted).
    fn unused(&self) -> usize {
        let used: usize = self
            .spans
            .iter()
            .filter(|(_, len)| *len != u32::MAX)
            .map(|(_, len)| *len as usize)
            .sum();
        self.bytes.len() - used
    }

    fn footprint(&self) -> usize {
        self.bytes.capacity() + self.spans.capacity() * 8
    }

    fn set(&mut self, i: usize, s: Option<&str>) {
        let span = match s {
            Some(s) => {
                self.bytes.push_str(s);
                ((self.bytes.len() - s.len()) as u32, s.len() as u32)
            }
            None => (0, u32::MAX),
        };
        if i == self.spans.len() {
            self.spans.push(span);
        } else {
            self.spans[i] = span;
        }
    }

    fn get(&self, i: usize) -> Option<&str> {
        let (start, len) = self.spans[i];
        (len != u32::MAX).then(|| &self.bytes[start as usize..(start + len) as usize])
    }
}

/// Nonzero for a vehicle, so no vehicle matches "none yet".
fn vehicle_hash(id: Option<&str>) -> u64 {
    id.map_or(0, |id| id_hash(id) | 1)
}

/// A checkpointed fleet: the same fields, without the index rebuilt from the ids.
#[derive(Deserialize)]
struct FleetRecord {
    ids: Vec<Arc<str>>,
    vehicles: Vec<Option<Arc<str>>>,
    rated: Vec<f64>,
    histories: Vec<BatteryHistory>,
}

impl From<FleetRecord> for Fleet {
    fn from(r: FleetRecord) -> Self {
        let mut index = HashTable::with_capacity(r.ids.len());
        let mut free = BinaryHeap::new();
        for (i, id) in r.ids.iter().enumerate() {
            if id.is_empty() {
                free.push(Reverse(i as u32));
                continue;
            }
            index.insert_unique(id_hash(id), i as u32, |&j| id_hash(&r.ids[j as usize]));
        }
        let (packed_ids, packed_vehicles) = pack(&r.ids, &r.vehicles);
        Self {
            index,
            free,
            packed_ids,
            packed_vehicles,
            ids: r.ids,
            vehicle_hashes: r
                .vehicles
                .iter()
                .map(|v| vehicle_hash(v.as_deref()))
                .collect(),
            vehicles: r.vehicles,
            rated: r.rated,
            histories: r.histories,
        }
    }
}

/// Ids and vehicles packed afresh; an evicted battery's empty id is no string.
fn pack(ids: &[Arc<str>], vehicles: &[Option<Arc<str>>]) -> (PackedStrings, PackedStrings) {
    let mut packed_ids = PackedStrings::default();
    let mut packed_vehicles = PackedStrings::default();
    for (i, (id, vehicle)) in ids.iter().zip(vehicles).enumerate() {
        packed_ids.set(i, (!id.is_empty()).then_some(&**id));
        packed_vehicles.set(i, vehicle.as_deref());
    }
    (packed_ids, packed_vehicles)
}

impl Fleet {
    /// The index of battery `id` (whose [`id_hash`] is `hash`), added if new.
    pub(super) fn intern(&mut self, id: &str, hash: u64) -> u32 {
        if let Some(i) = self.find(id, hash) {
            return i;
        }
        if let Some(Reverse(i)) = self.free.pop() {
            self.reuse(i, id, hash);
            return i;
        }
        let i = self.ids.len() as u32;
        let packed = &self.packed_ids;
        self.index.insert_unique(hash, i, |&j| {
            id_hash(packed.get(j as usize).unwrap_or_default())
        });
        self.ids.push(Arc::from(id));
        self.vehicles.push(None);
        self.vehicle_hashes.push(0);
        self.packed_ids.set(i as usize, Some(id));
        self.packed_vehicles.set(i as usize, None);
        self.rated.push(0.0);
        self.histories.push(BatteryHistory::default());
        i
    }

    /// Gives an evicted battery's slot to battery `id`.
    fn reuse(&mut self, i: u32, id: &str, hash: u64) {
        let packed = &self.packed_ids;
        self.index.insert_unique(hash, i, |&j| {
            id_hash(packed.get(j as usize).unwrap_or_default())
        });
        let bi = i as usize;
        self.ids[bi] = Arc::from(id);
        self.packed_ids.set(bi, Some(id));
    }

    /// Forgets battery `b`: id, vehicle, rating and history. Its slot goes to the next
    /// new battery, so a fleet that turns over keeps the size of its live part.
    pub(super) fn evict(&mut self, b: u32) -> Arc<str> {
        let bi = b as usize;
        let hash = id_hash(&self.ids[bi]);
        if let Ok(entry) = self.index.find_entry(hash, |&i| i == b) {
            entry.remove();
        }
        let id = std::mem::replace(&mut self.ids[bi], Arc::from(""));
        self.vehicles[bi] = None;
        self.vehicle_hashes[bi] = 0;
        self.packed_ids.set(bi, None);
        self.packed_vehicles.set(bi, None);
        self.rated[bi] = 0.0;
        self.histories[bi] = BatteryHistory::default();
        self.free.push(Reverse(b));
        id
    }

    /// Packs the ids and vehicles afresh once most of their bytes belong to evicted or
    /// renamed batteries.
    pub(super) fn compact_strings(&mut self) {
        let unused = self.packed_ids.unused() + self.packed_vehicles.unused();
        let held = self.packed_ids.bytes.len() + self.packed_vehicles.bytes.len();
        if unused > 64 * 1024 && unused * 2 > held {
            (self.packed_ids, self.packed_vehicles) = pack(&self.ids, &self.vehicles);
        }
    }

    /// Whether slot `i` holds a battery (not an evicted one's empty slot).
    pub fn is_live(&self, i: usize) -> bool {
        self.ids.get(i).is_some_and(|id| !id.is_empty())
    }

    /// Batteries held (slots less evicted ones).
    pub fn live(&self) -> usize {
        self.ids.len() - self.free.len()
    }

    /// Records the battery's vehicle when it is new or changed.
    pub(super) fn set_vehicle(&mut self, battery: u32, vehicle: &str) {
        let hash = vehicle_hash(Some(vehicle));
        let b = battery as usize;
        if self.vehicle_hashes[b] != hash {
            self.vehicle_hashes[b] = hash;
            self.vehicles[b] = Some(Arc::from(vehicle));
            self.packed_vehicles.set(b, Some(vehicle));
        }
    }

    /// Moves battery `i` of `from` into this fleet (re-sharding); returns its index here.
    pub(super) fn adopt(&mut self, from: &mut Fleet, i: usize) -> u32 {
        let b = self.intern(&from.ids[i], id_hash(&from.ids[i]));
        let bi = b as usize;
        self.vehicles[bi] = from.vehicles[i].take();
        self.vehicle_hashes[bi] = vehicle_hash(self.vehicles[bi].as_deref());
        self.packed_vehicles.set(bi, self.vehicles[bi].as_deref());
        self.rated[bi] = from.rated[i];
        self.histories[bi] = std::mem::take(&mut from.histories[i]);
        b
    }

    /// The id of battery `b` (from the packed copy, for the per-row paths).
    pub(super) fn id_of(&self, b: u32) -> &str {
        self.packed_ids.get(b as usize).unwrap_or_default()
    }

    pub(super) fn vehicle_of(&self, b: u32) -> Option<&str> {
        self.packed_vehicles.get(b as usize)
    }

    pub fn get(&self, id: &str) -> Option<u32> {
        self.find(id, id_hash(id))
    }

    fn find(&self, id: &str, hash: u64) -> Option<u32> {
        let ids = &self.packed_ids;
        self.index
            .find(hash, |&i| ids.get(i as usize) == Some(id))
            .copied()
    }

    /// Slots, evicted ones included: battery indexes run below this.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Bytes held for the batteries themselves, histories apart: the index, ids,
    /// vehicles and ratings (shared strings counted with their allocation header).
    pub fn footprint(&self) -> usize {
        let shared = |s: &str| 16 + s.len().next_multiple_of(8);
        let index = self.index.capacity() * (std::mem::size_of::<u32>() + 1);
        let ids: usize = self.ids.iter().map(|id| shared(id)).sum();
        let vehicles: usize = self.vehicles.iter().flatten().map(|v| shared(v)).sum();
        index
            + ids
            + vehicles
            + self.ids.capacity() * std::mem::size_of::<Arc<str>>()
            + self.vehicles.capacity() * std::mem::size_of::<Option<Arc<str>>>()
            + self.vehicle_hashes.capacity() * 8
            + self.rated.capacity() * 8
            + self.packed_ids.footprint()
            + self.packed_vehicles.footprint()
            + (self.histories.capacity() - self.histories.len())
                * std::mem::size_of::<BatteryHistory>()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// One battery as the stages after the windows see it.
#[derive(Debug, Clone, Copy)]
pub struct BatteryView<'a> {
    pub id: &'a Arc<str>,
    pub vehicle: Option<&'a Arc<str>>,
    pub rated: f64,
    pub history: &'a BatteryHistory,
}

impl Fleet {
    /// Battery `i`, unless its slot is empty (evicted).
    pub fn view(&self, i: usize) -> Option<BatteryView<'_>> {
        if !self.is_live(i) {
            return None;
        }
        Some(BatteryView {
            id: self.ids.get(i)?,
            vehicle: self.vehicles.get(i)?.as_ref(),
            rated: *self.rated.get(i)?,
            history: self.histories.get(i)?,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = BatteryView<'_>> {
        (0..self.len()).filter_map(|i| self.view(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intern(f: &mut Fleet, id: &str) -> u32 {
        f.intern(id, id_hash(id))
    }

    #[test]
    fn an_evicted_slot_is_reused_and_survives_a_checkpoint_empty() {
        let mut fleet = Fleet::default();
        for id in ["a", "b", "c"] {
            intern(&mut fleet, id);
        }
        fleet.set_vehicle(1, "V-b");
        assert_eq!(&*fleet.evict(1), "b");
        assert_eq!((fleet.len(), fleet.live()), (3, 2));
        assert_eq!(fleet.get("b"), None);
        assert!(fleet.view(1).is_none());
        assert_eq!(fleet.iter().count(), 2);

        let bytes = postcard::to_allocvec(&fleet).unwrap();
        let mut restored: Fleet = postcard::from_bytes(&bytes).unwrap();
        for f in [&mut fleet, &mut restored] {
            assert_eq!(f.get("a"), Some(0));
            assert_eq!(f.get("c"), Some(2));
            assert_eq!(f.get("b"), None);
            assert_eq!(intern(f, "d"), 1, "the free slot first");
            assert_eq!(f.id_of(1), "d");
            assert_eq!(f.vehicle_of(1), None);
            assert_eq!(intern(f, "e"), 3);
            assert_eq!(f.live(), 4);
        }
    }
}
