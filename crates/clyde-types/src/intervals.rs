//! A set of half-open byte intervals, kept sorted and merged.
//!
//! It records which bytes of a blob that is still arriving are already on disk, and which
//! are claimed by a running transfer.

use std::ops::Range;

/// Sorted, non-overlapping, non-adjacent half-open intervals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IntervalSet {
    spans: Vec<Range<u64>>,
}

impl FromIterator<Range<u64>> for IntervalSet {
    fn from_iter<I: IntoIterator<Item = Range<u64>>>(spans: I) -> Self {
        let mut set = Self::new();
        for span in spans {
            set.insert(span);
        }
        set
    }
}

impl IntervalSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `range`, merging it with what it touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        // First span that ends at or after the new start (it may touch or overlap).
        let first = self.spans.partition_point(|s| s.end < range.start);
        let mut merged = range;
        let mut last = first;
        while last < self.spans.len() && self.spans[last].start <= merged.end {
            merged.start = merged.start.min(self.spans[last].start);
            merged.end = merged.end.max(self.spans[last].end);
            last += 1;
        }
        self.spans.splice(first..last, std::iter::once(merged));
    }

    /// Removes every byte of `range`, splitting a span it cuts through.
    pub fn remove(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let first = self.spans.partition_point(|s| s.end <= range.start);
        let mut last = first;
        let mut kept = Vec::new();
        while last < self.spans.len() && self.spans[last].start < range.end {
            let s = &self.spans[last];
            if s.start < range.start {
                kept.push(s.start..range.start);
            }
            if s.end > range.end {
                kept.push(range.end..s.end);
            }
            last += 1;
        }
        self.spans.splice(first..last, kept);
    }

    /// The parts of `within` not in the set, in order.
    pub fn gaps(&self, within: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut pos = within.start;
        while let Some(gap) = self.first_gap(pos..within.end) {
            pos = gap.end;
            out.push(gap);
        }
        out
    }

    /// The bytes of `range` that are in the set.
    pub fn within(&self, range: Range<u64>) -> IntervalSet {
        let mut out = IntervalSet::new();
        let first = self.spans.partition_point(|s| s.end <= range.start);
        for s in self.spans[first..].iter().take_while(|s| s.start < range.end) {
            out.insert(s.start.max(range.start)..s.end.min(range.end));
        }
        out
    }

    /// Whether byte `pos` is in the set.
    pub fn contains(&self, pos: u64) -> bool {
        self.covered_from(pos) > pos
    }

    /// The end of the covered run that contains `pos` (`pos` itself when `pos` is not covered).
    pub fn covered_from(&self, pos: u64) -> u64 {
        let i = self.spans.partition_point(|s| s.end <= pos);
        match self.spans.get(i) {
            Some(s) if s.start <= pos => s.end,
            _ => pos,
        }
    }

    /// Whether every byte of `range` is in the set.
    pub fn covers(&self, range: Range<u64>) -> bool {
        range.start >= range.end || self.covered_from(range.start) >= range.end
    }

    /// Whether any byte of `range` is in the set.
    pub fn intersects(&self, range: Range<u64>) -> bool {
        range.start < range.end && self.first_gap(range.clone()) != Some(range)
    }

    /// The first gap inside `within`, if any.
    pub fn first_gap(&self, within: Range<u64>) -> Option<Range<u64>> {
        let mut pos = within.start;
        while pos < within.end {
            let end = self.covered_from(pos);
            if end == pos {
                let i = self.spans.partition_point(|s| s.end <= pos);
                let gap_end = self.spans.get(i).map_or(within.end, |s| s.start.min(within.end));
                return Some(pos..gap_end);
            }
            pos = end;
        }
        None
    }

    /// Total number of bytes in the set.
    pub fn len(&self) -> u64 {
        self.spans.iter().map(|s| s.end - s.start).sum()
    }

    /// Whether the set holds no byte.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The intervals, in order.
    pub fn spans(&self) -> &[Range<u64>] {
        &self.spans
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn merges_touching_and_overlapping() {
        let mut s = IntervalSet::new();
        s.insert(10..20);
        s.insert(30..40);
        s.insert(20..30);
        assert_eq!(s.spans(), &[10..40]);
        s.insert(0..5);
        s.insert(3..12);
        assert_eq!(s.spans(), &[0..40]);
        assert_eq!(s.len(), 40);
    }

    #[test]
    fn gaps_and_coverage() {
        let mut s = IntervalSet::new();
        s.insert(0..10);
        s.insert(20..30);
        assert_eq!(s.covered_from(5), 10);
        assert_eq!(s.covered_from(10), 10);
        assert!(!s.contains(10));
        assert_eq!(s.first_gap(0..100), Some(10..20));
        assert_eq!(s.first_gap(20..100), Some(30..100));
        assert_eq!(s.first_gap(0..10), None);
        assert!(s.covers(21..30));
        assert!(!s.covers(21..31));
    }

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((0u64..200, 0u64..40, proptest::bool::ANY), 0..30)) {
            let mut set = IntervalSet::new();
            let mut bits = vec![false; 256];
            for (start, len, add) in ops {
                if add {
                    set.insert(start..start + len);
                } else {
                    set.remove(start..start + len);
                }
                for b in &mut bits[start as usize..(start + len) as usize] { *b = add; }
            }
            let gaps: IntervalSet = set.gaps(20..220).into_iter().collect();
            let within = set.within(20..220);
            for i in 20..220u64 {
                prop_assert_eq!(gaps.contains(i), !bits[i as usize]);
                prop_assert_eq!(within.contains(i), bits[i as usize]);
            }
            for (i, b) in bits.iter().enumerate() {
                prop_assert_eq!(set.contains(i as u64), *b);
            }
            prop_assert_eq!(set.len(), bits.iter().filter(|b| **b).count() as u64);
            for w in set.spans().windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
        }
    }

    #[test]
    fn intersection_with_a_range() {
        let mut s = IntervalSet::new();
        s.insert(10..20);
        s.insert(30..40);
        assert!(s.intersects(15..16));
        assert!(s.intersects(0..11));
        assert!(s.intersects(19..31));
        assert!(!s.intersects(20..30));
        assert!(!s.intersects(0..10));
        assert!(!s.intersects(15..15));
    }
}
