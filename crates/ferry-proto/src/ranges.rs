//! Sets of chunk indices kept as sorted, disjoint, coalesced ranges.
//!
//! Resume state is a `RangeSet` of verified chunks; what to send is
//! `wanted - have`.

use std::ops::Range;

/// A set of `u32` chunk indices stored as sorted half-open ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range<u32>>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// The set `0..n`.
    pub fn full(n: u32) -> Self {
        let mut s = Self::new();
        s.insert_range(0..n);
        s
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of indices in the set.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.end - r.start)).sum()
    }

    /// Number of ranges (the encoded size grows with this).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    pub fn contains(&self, i: u32) -> bool {
        let pos = self.ranges.partition_point(|r| r.end <= i);
        self.ranges.get(pos).is_some_and(|r| r.start <= i)
    }

    pub fn insert(&mut self, i: u32) {
        if i < u32::MAX {
            self.insert_range(i..i + 1);
        }
    }

    pub fn insert_range(&mut self, r: Range<u32>) {
        if r.start >= r.end {
            return;
        }
        // First range that ends at or after r.start (touching ranges merge).
        let lo = self.ranges.partition_point(|x| x.end < r.start);
        // First range that starts after r.end.
        let hi = self.ranges.partition_point(|x| x.start <= r.end);
        let mut merged = r;
        if lo < hi {
            merged.start = merged.start.min(self.ranges[lo].start);
            merged.end = merged.end.max(self.ranges[hi - 1].end);
        }
        self.ranges.splice(lo..hi, std::iter::once(merged));
    }

    pub fn remove(&mut self, i: u32) {
        if i < u32::MAX {
            self.remove_range(i..i + 1);
        }
    }

    pub fn remove_range(&mut self, r: Range<u32>) {
        if r.start >= r.end {
            return;
        }
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for x in self.ranges.drain(..) {
            if x.end <= r.start || x.start >= r.end {
                out.push(x);
                continue;
            }
            if x.start < r.start {
                out.push(x.start..r.start);
            }
            if x.end > r.end {
                out.push(r.end..x.end);
            }
        }
        self.ranges = out;
    }

    /// `self - other`.
    pub fn difference(&self, other: &RangeSet) -> RangeSet {
        let mut out = self.clone();
        for r in &other.ranges {
            out.remove_range(r.clone());
        }
        out
    }

    /// `self ∪ other`.
    pub fn union(&self, other: &RangeSet) -> RangeSet {
        let mut out = self.clone();
        for r in &other.ranges {
            out.insert_range(r.clone());
        }
        out
    }

    /// `self ∩ other`.
    pub fn intersection(&self, other: &RangeSet) -> RangeSet {
        self.difference(&self.difference(other))
    }

    /// Smallest index in the set.
    pub fn first(&self) -> Option<u32> {
        self.ranges.first().map(|r| r.start)
    }

    /// Removes and returns the smallest index.
    pub fn pop_first(&mut self) -> Option<u32> {
        let first = self.first()?;
        self.remove(first);
        Some(first)
    }

    pub fn iter_ranges(&self) -> impl Iterator<Item = &Range<u32>> + '_ {
        self.ranges.iter()
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|r| r.clone())
    }

    /// Builds a set from ranges in any order (overlaps allowed).
    pub fn from_ranges(ranges: impl IntoIterator<Item = Range<u32>>) -> Self {
        let mut s = Self::new();
        for r in ranges {
            s.insert_range(r);
        }
        s
    }
}

impl FromIterator<u32> for RangeSet {
    fn from_iter<T: IntoIterator<Item = u32>>(iter: T) -> Self {
        let mut s = Self::new();
        for i in iter {
            s.insert(i);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u32),
        Remove(u32, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..200, 0u32..20).prop_map(|(a, l)| Op::Insert(a, a + l)),
            (0u32..200, 0u32..20).prop_map(|(a, l)| Op::Remove(a, a + l)),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec(op(), 0..60)) {
            let mut s = RangeSet::new();
            let mut model = BTreeSet::new();
            for o in ops {
                match o {
                    Op::Insert(a, b) => { s.insert_range(a..b); model.extend(a..b); }
                    Op::Remove(a, b) => { s.remove_range(a..b); for i in a..b { model.remove(&i); } }
                }
                // invariant: sorted, disjoint, non-touching, non-empty
                for w in s.ranges.windows(2) {
                    prop_assert!(w[0].end < w[1].start);
                }
                for r in &s.ranges { prop_assert!(r.start < r.end); }
            }
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(s.count(), model.len() as u64);
            for i in 0..230 { prop_assert_eq!(s.contains(i), model.contains(&i)); }
        }

        #[test]
        fn set_algebra(a in proptest::collection::vec(0u32..100, 0..50), b in proptest::collection::vec(0u32..100, 0..50)) {
            let sa: RangeSet = a.iter().copied().collect();
            let sb: RangeSet = b.iter().copied().collect();
            let ma: BTreeSet<u32> = a.into_iter().collect();
            let mb: BTreeSet<u32> = b.into_iter().collect();
            prop_assert_eq!(sa.difference(&sb).iter().collect::<Vec<_>>(), ma.difference(&mb).copied().collect::<Vec<_>>());
            prop_assert_eq!(sa.union(&sb).iter().collect::<Vec<_>>(), ma.union(&mb).copied().collect::<Vec<_>>());
            prop_assert_eq!(sa.intersection(&sb).iter().collect::<Vec<_>>(), ma.intersection(&mb).copied().collect::<Vec<_>>());
        }
    }

    #[test]
    fn edges() {
        let mut s = RangeSet::full(5);
        s.remove(0);
        s.remove(4);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(s.pop_first(), Some(1));
        s.insert(u32::MAX);
        assert!(!s.contains(u32::MAX));
        assert!(RangeSet::full(0).is_empty());
    }
}
