//! Exact duplicate detection for one subscriber: which sequence indexes it has received.
//!
//! The broker keeps each connection in publish (offset) order, but the bench sends several
//! publish requests at once, so the broker may sequence a later batch before an earlier one:
//! `seq` order on a connection is "almost" increasing, not strictly. A duplicate therefore
//! cannot be told from "not above the last seq", and a bitmap of every index would cost
//! `events / 8` bytes per subscriber. [`Seen`] keeps the contiguous prefix received so far as a
//! single number, a small bitmap window after it (which follows the prefix as it fills), and
//! an ordered set for the rare index beyond the window. Memory stays a few words per
//! subscriber while the reordering is short, and the answer is exact in every case.

use std::collections::{BTreeSet, VecDeque};

/// Largest bitmap window, in 64-bit words (65 536 indexes, 8 KiB); indexes further ahead of
/// the prefix go to the overflow set.
const MAX_WORDS: usize = 1024;

/// The set of indexes one subscriber has received.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every index below `base` was received; `base` is a multiple of 64.
    base: u64,
    /// Bit `i % 64` of word `i / 64` is index `base + i`.
    words: VecDeque<u64>,
    /// Received indexes at or beyond `base + MAX_WORDS * 64`.
    overflow: BTreeSet<u64>,
}

impl Seen {
    /// Records `index`; `false` if it was already there (a duplicate).
    pub fn insert(&mut self, index: u64) -> bool {
        if index < self.base {
            return false;
        }
        let offset = index - self.base;
        let word = (offset / 64) as usize;
        if word >= MAX_WORDS {
            return self.overflow.insert(index);
        }
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let bit = 1u64 << (offset % 64);
        if self.words[word] & bit != 0 {
            return false;
        }
        self.words[word] |= bit;
        self.slide();
        true
    }

    /// Drops full words from the front, and pulls overflow indexes into the window as it moves.
    fn slide(&mut self) {
        while self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.base += 64;
            let limit = self.base + (MAX_WORDS as u64) * 64;
            while let Some(&index) = self.overflow.first() {
                if index >= limit {
                    break;
                }
                self.overflow.pop_first();
                let offset = index - self.base;
                let word = (offset / 64) as usize;
                if word >= self.words.len() {
                    self.words.resize(word + 1, 0);
                }
                self.words[word] |= 1u64 << (offset % 64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_reordered_inserts_are_unique_once() {
        let mut seen = Seen::default();
        for i in (0..1000).rev().step_by(2).chain((0..1000).step_by(2)) {
            assert!(seen.insert(i), "{i}");
        }
        for i in 0..1000 {
            assert!(!seen.insert(i), "{i} again");
        }
        assert_eq!(seen.base, 960);
        assert!(seen.overflow.is_empty());
    }

    #[test]
    fn far_ahead_indexes_overflow_and_come_back() {
        let mut seen = Seen::default();
        let far = (MAX_WORDS as u64) * 64 + 10;
        assert!(seen.insert(far));
        assert!(!seen.insert(far));
        assert_eq!(seen.overflow.len(), 1);
        for i in 0..far {
            assert!(seen.insert(i), "{i}");
        }
        assert!(seen.overflow.is_empty());
        assert!(!seen.insert(far));
        assert!(seen.insert(far + 1));
        assert!(seen.words.len() <= 2, "{:?}", seen.words);
    }

    #[test]
    fn a_gap_keeps_the_window_bounded() {
        let mut seen = Seen::default();
        // Index 0 never arrives (lost): everything else lands in the window or the overflow.
        for i in 1..200_000 {
            assert!(seen.insert(i));
        }
        assert_eq!(seen.base, 0);
        assert_eq!(seen.words.len(), MAX_WORDS);
        assert!(seen.insert(0));
        assert_eq!(seen.base, 200_000);
        assert!(seen.overflow.is_empty());
        assert!(!seen.insert(150_000));
    }
}
