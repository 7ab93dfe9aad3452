//! Fixed-size pieces: the unit in which a blob's progress is made durable and resumed.

use std::ops::Range;

/// Default piece size: large enough that a 1 GiB blob has 256 pieces, small enough that a
/// crash loses little and a lazy puller's range maps to one piece.
pub const DEFAULT_PIECE_SIZE: u64 = 4 * 1024 * 1024;

/// How a blob of a given size is cut into pieces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceLayout {
    size: u64,
    piece_size: u64,
}

impl PieceLayout {
    /// A layout for a blob of `size` bytes with pieces of `piece_size` (> 0) bytes.
    pub fn new(size: u64, piece_size: u64) -> Self {
        assert!(piece_size > 0, "piece size must be positive");
        Self { size, piece_size }
    }

    /// The blob size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The piece size.
    pub fn piece_size(&self) -> u64 {
        self.piece_size
    }

    /// Number of pieces (0 for an empty blob).
    pub fn count(&self) -> u64 {
        self.size.div_ceil(self.piece_size)
    }

    /// The piece that holds byte `offset`.
    pub fn piece_of(&self, offset: u64) -> u64 {
        offset / self.piece_size
    }

    /// The byte range of piece `index`.
    pub fn bounds(&self, index: u64) -> Range<u64> {
        let start = (index * self.piece_size).min(self.size);
        start..(start + self.piece_size).min(self.size)
    }

    /// The pieces entirely inside `range`.
    pub fn pieces_within(&self, range: Range<u64>) -> Range<u64> {
        let first = range.start.div_ceil(self.piece_size);
        let last = if range.end >= self.size { self.count() } else { range.end / self.piece_size };
        first..last.max(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic() {
        let l = PieceLayout::new(10, 4);
        assert_eq!(l.count(), 3);
        assert_eq!(l.bounds(2), 8..10);
        assert_eq!(l.piece_of(9), 2);
        assert_eq!(l.pieces_within(0..10), 0..3);
        assert_eq!(l.pieces_within(1..8), 1..2);
        assert_eq!(l.pieces_within(1..3), 1..1);
        assert_eq!(PieceLayout::new(0, 4).count(), 0);
    }
}
