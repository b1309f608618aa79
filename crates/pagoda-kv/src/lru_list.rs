//! A doubly linked list threaded through two arrays indexed by block id, ordering the blocks that are
//! cached but unreferenced from least to most recently released.
//!
//! Links live in arrays rather than nodes so that pushing, unlinking any block and popping the oldest are
//! all O(1) without allocation, which keeps allocation under eviction pressure O(1) as well.

/// Marks "no block" in a link.
const NIL: usize = usize::MAX;

/// Blocks in least-recently-used order; each block is in the list at most once.
#[derive(Clone, Debug)]
pub(crate) struct LruList {
    /// The block before each listed block (toward the least recent end), or `NIL`.
    prev: Vec<usize>,
    /// The block after each listed block (toward the most recent end), or `NIL`.
    next: Vec<usize>,
    /// Least recently pushed block, or `NIL` when empty.
    head: usize,
    /// Most recently pushed block, or `NIL` when empty.
    tail: usize,
    len: usize,
}

impl LruList {
    /// An empty list over blocks `0..capacity`.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            prev: vec![NIL; capacity],
            next: vec![NIL; capacity],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    /// Number of listed blocks.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether `block` is listed. Out-of-range blocks never are.
    pub(crate) fn contains(&self, block: usize) -> bool {
        // Only the head has no predecessor, so a listed block either has one or is the head.
        block < self.prev.len() && (self.prev[block] != NIL || self.head == block)
    }

    /// Appends `block` at the most recent end. Returns `false` (and changes nothing) if it is already
    /// listed or out of range.
    pub(crate) fn push_back(&mut self, block: usize) -> bool {
        if block >= self.prev.len() || self.contains(block) {
            return false;
        }
        self.prev[block] = self.tail;
        self.next[block] = NIL;
        match self.tail {
            NIL => self.head = block,
            tail => self.next[tail] = block,
        }
        self.tail = block;
        self.len += 1;
        true
    }

    /// Unlinks `block` wherever it is. Returns whether it was listed.
    pub(crate) fn remove(&mut self, block: usize) -> bool {
        if !self.contains(block) {
            return false;
        }
        let (prev, next) = (self.prev[block], self.next[block]);
        match prev {
            NIL => self.head = next,
            prev => self.next[prev] = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.prev[next] = prev,
        }
        self.prev[block] = NIL;
        self.next[block] = NIL;
        self.len -= 1;
        true
    }

    /// Unlinks and returns the least recently pushed block.
    pub(crate) fn pop_front(&mut self) -> Option<usize> {
        let head = self.head;
        (head != NIL && self.remove(head)).then_some(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(list: &mut LruList) -> Vec<usize> {
        std::iter::from_fn(|| list.pop_front()).collect()
    }

    #[test]
    fn pops_in_push_order() {
        let mut list = LruList::new(5);
        for block in [3, 0, 4] {
            assert!(list.push_back(block));
        }
        assert_eq!(list.len(), 3);
        assert_eq!(drain(&mut list), [3, 0, 4]);
        assert_eq!(list.len(), 0);
        assert_eq!(list.pop_front(), None);
    }

    #[test]
    fn removes_from_head_middle_and_tail() {
        let mut list = LruList::new(6);
        for block in 0..6 {
            list.push_back(block);
        }
        assert!(list.remove(0));
        assert!(list.remove(3));
        assert!(list.remove(5));
        assert!(!list.remove(3), "already removed");
        assert!(!list.contains(3));
        assert!(list.contains(4));
        assert_eq!(drain(&mut list), [1, 2, 4]);
    }

    #[test]
    fn a_block_is_listed_at_most_once_and_can_return() {
        let mut list = LruList::new(3);
        assert!(list.push_back(1));
        assert!(!list.push_back(1));
        assert!(list.push_back(2));
        assert!(list.remove(1));
        assert!(list.push_back(1));
        assert_eq!(drain(&mut list), [2, 1]);
    }

    #[test]
    fn out_of_range_blocks_are_refused() {
        let mut list = LruList::new(2);
        assert!(!list.push_back(2));
        assert!(!list.contains(7));
        assert!(!list.remove(7));
        assert_eq!(list.len(), 0);
        let mut empty = LruList::new(0);
        assert!(!empty.push_back(0));
        assert_eq!(empty.pop_front(), None);
    }
}
