//! The window of message ids already delivered, so one message means one handler call
//! whichever path (direct peek, group poll, SSE) brings it, and however often.
//!
//! Bounded: once full, the oldest id is forgotten first. The bound only has to exceed what
//! can come back within one poll (a direct page plus each group's page); acked direct
//! messages never return.
//!
//! Ids alone are not enough for group messages: a group post reaches a member as its own
//! fan-out copy and as the conversation listing's row, with different ids. Both carry the
//! same `groupId` when they come by REST, so the key is `groupId ?? id`; but the real
//! server's SSE frame carries no `groupId`. [`CopyTwins`] pairs such a stream copy with its
//! listing row by what the copies share (conversation, sender, second, content).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::OnceLock;

use super::clock;
use super::message::ConduitMessage;

/// Default number of ids remembered.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Ids are kept as 128-bit hashes, keyed once per process at random ([`IdHash`]): 32 bytes
/// an id in the set and the order together, with no allocation of its own (a 36-character
/// UUID kept as a string cost ~100 bytes and a `malloc`/`free` each). Two ids hash alike
/// with a chance of about 2^-128 per pair, far below the chance of two UUIDs being equal,
/// and nobody outside the process can compute a hash to aim for. Nothing is reserved up
/// front: a poller that sees few messages (most of 1,000 idle ones) holds few bytes.
#[derive(Clone, Debug)]
pub struct SeenWindow {
    ids: HashSet<u128, IdHash>,
    order: VecDeque<u128>,
    capacity: usize,
}

impl SeenWindow {
    pub fn new(capacity: usize) -> Self {
        Self {
            ids: HashSet::with_hasher(IdHash),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(&id_hash(id))
    }

    /// Records `id`; returns false when it was already there (a duplicate).
    pub fn insert(&mut self, id: &str) -> bool {
        let id = id_hash(id);
        if self.ids.contains(&id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.ids.insert(id);
        self.order.push_back(id);
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Bytes this window holds on the heap, as allocated.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        let slot = std::mem::size_of::<u128>();
        self.ids.capacity() * (slot + 1) + self.order.capacity() * slot
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// The process's two random keys for [`id_hash`].
fn id_keys() -> &'static [RandomState; 2] {
    static KEYS: OnceLock<[RandomState; 2]> = OnceLock::new();
    KEYS.get_or_init(|| [RandomState::new(), RandomState::new()])
}

/// An id as 128 bits: two SipHashes of it under independent random keys.
fn id_hash(id: &str) -> u128 {
    let [high, low] = id_keys();
    (u128::from(high.hash_one(id)) << 64) | u128::from(low.hash_one(id))
}

/// Hashes a [`SeenWindow`] entry, already a keyed hash, by its low 64 bits: hashing it again
/// would only cost time.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHash;

impl BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Debug)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u128s are hashed here; any other input still gets a usable (if slow) hash.
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }
}

impl Default for SeenWindow {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

/// What every fan-out copy of one group message shares: its conversation, its sender, its
/// second (stored times are whole seconds) and its content, hashed together. A hash, not the
/// fields: every direct message with a conversation is remembered here (10,000 of them), and
/// two copies of its sender and conversation each were ~3 MiB of small allocations in a
/// burst. Two different messages hashing alike (1 in 2^64 per pair) would pair up. The hash
/// is keyed once per process at random, so nobody outside can look for content that hashes
/// like another sender's message to have it dropped as a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(u64);

impl Fingerprint {
    /// A message's fingerprint, when it has a conversation and a readable timestamp.
    pub fn of(message: &ConduitMessage) -> Option<Self> {
        let conversation = message.thread_id.as_deref()?;
        let second = clock::parse_iso_ms(&message.timestamp)?.div_euclid(1000);
        static KEY: OnceLock<RandomState> = OnceLock::new();
        let fields = (
            conversation,
            message.from.as_str(),
            second,
            message.content.as_str(),
        );
        Some(Self(KEY.get_or_init(RandomState::new).hash_one(fields)))
    }
}

/// Pairs a group message that came without its `groupId` (a stream copy) with one that came
/// with it (a listing row or a peek copy), in either order. Only copies of different kinds
/// pair up, each at most once: two posts alike in every shared field but arriving the same
/// way stay two messages.
#[derive(Debug)]
pub struct CopyTwins {
    /// Unpaired fingerprints, counted, by whether the message carried a `groupId`.
    unpaired: [HashMap<Fingerprint, u32>; 2],
    order: VecDeque<(Fingerprint, bool)>,
    capacity: usize,
}

impl CopyTwins {
    pub fn new(capacity: usize) -> Self {
        Self {
            unpaired: [HashMap::new(), HashMap::new()],
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records a message; true when it is the twin of one recorded earlier from the other
    /// kind of path (so a copy of a message already taken).
    pub fn is_twin(&mut self, fingerprint: Fingerprint, has_group_id: bool) -> bool {
        let other = &mut self.unpaired[usize::from(!has_group_id)];
        if let Some(count) = other.get_mut(&fingerprint) {
            *count -= 1;
            if *count == 0 {
                other.remove(&fingerprint);
            }
            return true;
        }
        if self.order.len() == self.capacity
            && let Some((oldest, kind)) = self.order.pop_front()
        {
            let map = &mut self.unpaired[usize::from(kind)];
            if let Some(count) = map.get_mut(&oldest) {
                *count -= 1;
                if *count == 0 {
                    map.remove(&oldest);
                }
            }
        }
        *self.unpaired[usize::from(has_group_id)]
            .entry(fingerprint)
            .or_insert(0) += 1;
        self.order.push_back((fingerprint, has_group_id));
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(id: &str, group: Option<&str>, from: &str, content: &str, at: &str) -> ConduitMessage {
        ConduitMessage {
            id: id.into(),
            from: from.into(),
            content: content.into(),
            tags: None,
            thread_id: Some("ops".into()),
            group_id: group.map(str::to_owned),
            timestamp: at.into(),
            metadata: None,
        }
    }

    #[test]
    fn a_stream_copy_and_its_listing_row_are_twins_in_either_order() {
        let streamed = post("c2", None, "bob", "@alice go", "2026-04-07T12:00:00+00:00");
        let listed = post("c1", Some("g"), "bob", "@alice go", "2026-04-07T12:00:00Z");
        let fp = |m: &ConduitMessage| Fingerprint::of(m).unwrap();
        let mut twins = CopyTwins::new(100);
        assert!(!twins.is_twin(fp(&streamed), false));
        assert!(twins.is_twin(fp(&listed), true));
        let mut twins = CopyTwins::new(100);
        assert!(!twins.is_twin(fp(&listed), true));
        assert!(twins.is_twin(fp(&streamed), false));
        // Paired once: a third copy of the same kind is not swallowed by the used pair.
        assert!(!twins.is_twin(fp(&streamed), false));
    }

    #[test]
    fn alike_messages_of_one_kind_never_pair_and_differences_count() {
        let mut twins = CopyTwins::new(100);
        let a = post("a", None, "bob", "ok", "2026-04-07T12:00:00Z");
        let b = post("b", None, "bob", "ok", "2026-04-07T12:00:00Z");
        assert!(!twins.is_twin(Fingerprint::of(&a).unwrap(), false));
        assert!(!twins.is_twin(Fingerprint::of(&b).unwrap(), false));
        for other in [
            post("x", Some("g"), "carol", "ok", "2026-04-07T12:00:00Z"),
            post("x", Some("g"), "bob", "ok!", "2026-04-07T12:00:00Z"),
            post("x", Some("g"), "bob", "ok", "2026-04-07T12:00:01Z"),
        ] {
            assert!(
                !twins.is_twin(Fingerprint::of(&other).unwrap(), true),
                "{other:?}"
            );
        }
        // Both unpaired stream copies find a listing row each.
        let row = post("r", Some("g"), "bob", "ok", "2026-04-07T12:00:00.000Z");
        assert!(twins.is_twin(Fingerprint::of(&row).unwrap(), true));
        assert!(twins.is_twin(Fingerprint::of(&row).unwrap(), true));
        assert!(!twins.is_twin(Fingerprint::of(&row).unwrap(), true));
        let mut no_thread = row.clone();
        no_thread.thread_id = None;
        assert_eq!(Fingerprint::of(&no_thread), None);
    }

    #[test]
    fn a_fingerprint_cannot_be_computed_outside_the_process() {
        // Keyed per process: a sender cannot search offline for content whose fingerprint
        // matches another message's and so have that message taken for a copy and dropped.
        let m = post("m", None, "bob", "ok", "2026-04-07T12:00:00Z");
        use std::hash::{Hash, Hasher};
        let mut unkeyed = std::collections::hash_map::DefaultHasher::new();
        ("ops", "bob", 1_775_563_200_i64, "ok").hash(&mut unkeyed);
        assert_ne!(Fingerprint::of(&m).unwrap().0, unkeyed.finish());
    }

    #[test]
    fn twins_stay_bounded() {
        let mut twins = CopyTwins::new(10);
        for i in 0..1000 {
            let m = post("m", None, "bob", &i.to_string(), "2026-04-07T12:00:00Z");
            twins.is_twin(Fingerprint::of(&m).unwrap(), false);
        }
        assert_eq!(twins.order.len(), 10);
        assert_eq!(twins.unpaired[0].len(), 10);
    }

    #[test]
    fn a_new_window_reserves_nothing_up_front() {
        let w = SeenWindow::new(DEFAULT_CAPACITY);
        assert_eq!((w.ids.capacity(), w.order.capacity()), (0, 0));
    }

    #[test]
    fn first_insert_wins() {
        let mut w = SeenWindow::new(10);
        assert!(w.insert("a"));
        assert!(!w.insert("a"));
        assert!(w.contains("a"));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn forgets_oldest_past_capacity() {
        let mut w = SeenWindow::new(3);
        for id in ["a", "b", "c", "d"] {
            assert!(w.insert(id));
        }
        assert_eq!(w.len(), 3);
        assert!(!w.contains("a"));
        assert!(w.contains("b") && w.contains("d"));
        // A forgotten id counts as new again: the bound is a trade of memory for that risk.
        assert!(w.insert("a"));
        assert!(!w.contains("b"));
    }

    #[test]
    fn a_full_window_of_uuids_holds_under_600_kib() {
        let mut w = SeenWindow::new(DEFAULT_CAPACITY);
        for i in 0..DEFAULT_CAPACITY {
            w.insert(&format!("5f0c1f8e-7a55-4b7e-9d55-{i:012}"));
        }
        assert!(w.heap_bytes() < 600 * 1024, "{} bytes", w.heap_bytes());
    }

    #[test]
    fn memory_stays_bounded_under_a_flood() {
        let mut w = SeenWindow::new(1000);
        for i in 0..100_000 {
            w.insert(&i.to_string());
        }
        assert_eq!(w.len(), 1000);
        assert_eq!(w.ids.len(), 1000);
        assert!(w.contains("99999") && !w.contains("98999"));
    }
}
