//! The window of message ids already delivered, so one message means one handler call
//! whichever path (direct peek, group poll, SSE) brings it, and however often.
//!
//! Bounded: once full, the oldest id is forgotten first. The bound only has to exceed what
//! can come back within one poll (a direct page plus each group's page); acked direct
//! messages never return.

use std::collections::{HashSet, VecDeque};

/// Default number of ids remembered.
pub const DEFAULT_CAPACITY: usize = 10_000;

#[derive(Debug)]
pub struct SeenWindow {
    ids: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl SeenWindow {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            ids: HashSet::with_capacity(capacity.min(DEFAULT_CAPACITY)),
            order: VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY)),
            capacity,
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Records `id`; returns false when it was already there (a duplicate).
    pub fn insert(&mut self, id: &str) -> bool {
        if self.ids.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.ids.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl Default for SeenWindow {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
