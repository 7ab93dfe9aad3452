//! Fixed-size pieces: the unit in which a blob's progress is made durable and resumed, and
//! in which bytes from peers are verified ([`PieceHashes`]).

use std::ops::Range;

use sha2::{Digest as _, Sha256};

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

/// The sha256 of one piece's bytes.
pub type PieceHash = [u8; 32];

/// The sha256 of `bytes` (one piece).
pub fn hash_piece(bytes: &[u8]) -> PieceHash {
    Sha256::digest(bytes).into()
}

/// Piece hashes of bytes fed in order from the blob's first byte: the hash of every piece
/// the fed prefix covers whole.
#[derive(Clone)]
pub struct PieceHasher {
    layout: PieceLayout,
    current: Sha256,
    fed: u64,
    done: Vec<PieceHash>,
}

impl PieceHasher {
    /// Hashes pieces of `layout`.
    pub fn new(layout: PieceLayout) -> Self {
        Self { layout, current: Sha256::new(), fed: 0, done: Vec::new() }
    }

    /// Feeds the next bytes, in order; bytes past the blob's end are ignored.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.fed < self.layout.size() {
            let piece_end = self.layout.bounds(self.layout.piece_of(self.fed)).end;
            let take = ((piece_end - self.fed) as usize).min(bytes.len());
            self.current.update(&bytes[..take]);
            self.fed += take as u64;
            bytes = &bytes[take..];
            if self.fed == piece_end {
                let hasher = std::mem::replace(&mut self.current, Sha256::new());
                self.done.push(hasher.finalize().into());
            }
        }
    }

    /// The hashes of the pieces fed whole, in order.
    pub fn done(&self) -> &[PieceHash] {
        &self.done
    }
}

/// Why a peer's piece list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PieceListError {
    #[error("not a piece list (bad magic)")]
    Magic,
    #[error("piece list truncated")]
    Truncated,
    #[error(
        "piece list is for a blob of {got} bytes in pieces of {piece}, expected {expected_size} in {expected_piece}"
    )]
    Layout { got: u64, piece: u64, expected_size: u64, expected_piece: u64 },
    #[error("piece list has a bad entry tag {0}")]
    Tag(u8),
    #[error("piece list has {0} bytes after its last entry")]
    Trailing(usize),
}

/// The sha256 of every piece of a blob that a holder vouches for (pieces it does not hold
/// yet, or holds only unverified, are absent): what a node checks each piece from a peer
/// against before any client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PieceHashes {
    layout: PieceLayout,
    hashes: Vec<Option<PieceHash>>,
}

const LIST_MAGIC: &[u8; 4] = b"CPH1";

impl PieceHashes {
    /// No hash known yet.
    pub fn new(layout: PieceLayout) -> Self {
        Self { layout, hashes: vec![None; layout.count() as usize] }
    }

    /// Every piece's hash, in order (`hashes.len()` must be the layout's piece count).
    pub fn complete(layout: PieceLayout, hashes: Vec<PieceHash>) -> Option<Self> {
        (hashes.len() as u64 == layout.count()).then(|| Self { layout, hashes: hashes.into_iter().map(Some).collect() })
    }

    /// The layout the hashes are for.
    pub fn layout(&self) -> PieceLayout {
        self.layout
    }

    /// Piece `index`'s hash, if known.
    pub fn get(&self, index: u64) -> Option<PieceHash> {
        self.hashes.get(index as usize).copied().flatten()
    }

    /// Records piece `index`'s hash (ignored past the last piece).
    pub fn set(&mut self, index: u64, hash: PieceHash) {
        if let Some(slot) = self.hashes.get_mut(index as usize) {
            *slot = Some(hash);
        }
    }

    /// Forgets piece `index`'s hash (it is asked for again).
    pub fn clear(&mut self, index: u64) {
        if let Some(slot) = self.hashes.get_mut(index as usize) {
            *slot = None;
        }
    }

    /// How many hashes are known.
    pub fn known(&self) -> usize {
        self.hashes.iter().filter(|h| h.is_some()).count()
    }

    /// Whether every piece's hash is known.
    pub fn is_complete(&self) -> bool {
        self.hashes.iter().all(Option::is_some)
    }

    /// Takes the hashes `other` knows that this list lacks (a known hash is never replaced).
    pub fn fill_from(&mut self, other: &PieceHashes) {
        if other.layout != self.layout {
            return;
        }
        for (mine, theirs) in self.hashes.iter_mut().zip(&other.hashes) {
            if mine.is_none() {
                *mine = *theirs;
            }
        }
    }

    /// The wire form: `CPH1`, the blob size and piece size (u64, big-endian), then per piece
    /// a tag byte (0: unknown, 1: known) and, when known, its 32-byte hash.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.hashes.len() * 33);
        out.extend_from_slice(LIST_MAGIC);
        out.extend_from_slice(&self.layout.size().to_be_bytes());
        out.extend_from_slice(&self.layout.piece_size().to_be_bytes());
        for hash in &self.hashes {
            match hash {
                Some(h) => {
                    out.push(1);
                    out.extend_from_slice(h);
                }
                None => out.push(0),
            }
        }
        out
    }

    /// Reads a peer's list for a blob of the `expected` layout (the size from a trusted
    /// source): any other layout, a bad tag, a short or long body is refused.
    pub fn decode(bytes: &[u8], expected: PieceLayout) -> Result<Self, PieceListError> {
        let (magic, rest) = bytes.split_at_checked(4).ok_or(PieceListError::Truncated)?;
        if magic != LIST_MAGIC {
            return Err(PieceListError::Magic);
        }
        let (size, rest) = rest.split_at_checked(8).ok_or(PieceListError::Truncated)?;
        let (piece, mut rest) = rest.split_at_checked(8).ok_or(PieceListError::Truncated)?;
        let size = u64::from_be_bytes(size.try_into().unwrap_or_default());
        let piece = u64::from_be_bytes(piece.try_into().unwrap_or_default());
        if size != expected.size() || piece != expected.piece_size() {
            return Err(PieceListError::Layout {
                got: size,
                piece,
                expected_size: expected.size(),
                expected_piece: expected.piece_size(),
            });
        }
        let mut list = Self::new(expected);
        for slot in list.hashes.iter_mut() {
            let (&tag, after) = rest.split_first().ok_or(PieceListError::Truncated)?;
            rest = after;
            match tag {
                0 => {}
                1 => {
                    let (hash, after) = rest.split_at_checked(32).ok_or(PieceListError::Truncated)?;
                    *slot = Some(hash.try_into().unwrap_or_default());
                    rest = after;
                }
                other => return Err(PieceListError::Tag(other)),
            }
        }
        if !rest.is_empty() {
            return Err(PieceListError::Trailing(rest.len()));
        }
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_hasher_hashes_each_piece_fed_in_any_chunking() {
        let data: Vec<u8> = (0..10u8).collect();
        let layout = PieceLayout::new(10, 4);
        let expected = [hash_piece(&data[0..4]), hash_piece(&data[4..8]), hash_piece(&data[8..10])];
        for cut in 1..10 {
            let mut h = PieceHasher::new(layout);
            for chunk in data.chunks(cut) {
                h.update(chunk);
            }
            assert_eq!(h.done(), expected, "chunks of {cut}");
        }
        let mut h = PieceHasher::new(layout);
        h.update(&data[..6]);
        assert_eq!(h.done(), &expected[..1]);
    }

    #[test]
    fn piece_lists_round_trip_and_refuse_what_does_not_fit() {
        let layout = PieceLayout::new(10, 4);
        let mut list = PieceHashes::new(layout);
        list.set(0, [7; 32]);
        list.set(2, [9; 32]);
        list.set(3, [1; 32]);
        let bytes = list.encode();
        assert_eq!(bytes.len(), 20 + 33 + 1 + 33);
        let back = PieceHashes::decode(&bytes, layout).unwrap();
        assert_eq!(back, list);
        assert_eq!((back.known(), back.get(1), back.get(2)), (2, None, Some([9; 32])));
        // Another size (a peer's claim that differs from the trusted one) is refused.
        assert!(matches!(PieceHashes::decode(&bytes, PieceLayout::new(11, 4)), Err(PieceListError::Layout { .. })));
        assert_eq!(PieceHashes::decode(&bytes[..bytes.len() - 1], layout), Err(PieceListError::Truncated));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(PieceHashes::decode(&long, layout), Err(PieceListError::Trailing(1)));
        let mut bad = bytes.clone();
        bad[20] = 2;
        assert_eq!(PieceHashes::decode(&bad, layout), Err(PieceListError::Tag(2)));
        assert_eq!(PieceHashes::decode(b"XXXX", layout), Err(PieceListError::Magic));
        assert_eq!(PieceHashes::decode(b"CP", layout), Err(PieceListError::Truncated));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_without_panic_and_what_decodes_encodes_back(
            size in 0u64..64, piece in 1u64..16, bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)
        ) {
            let layout = PieceLayout::new(size, piece);
            if let Ok(list) = PieceHashes::decode(&bytes, layout) {
                proptest::prop_assert_eq!(list.encode(), bytes);
            }
            let mut list = PieceHashes::new(layout);
            for i in (0..layout.count()).step_by(2) {
                list.set(i, [i as u8; 32]);
            }
            proptest::prop_assert_eq!(PieceHashes::decode(&list.encode(), layout), Ok(list));
        }
    }

    #[test]
    fn filling_never_replaces_a_known_hash() {
        let layout = PieceLayout::new(8, 4);
        let mut mine = PieceHashes::new(layout);
        mine.set(0, [1; 32]);
        let theirs = PieceHashes::complete(layout, vec![[2; 32], [3; 32]]).unwrap();
        mine.fill_from(&theirs);
        assert_eq!((mine.get(0), mine.get(1), mine.is_complete()), (Some([1; 32]), Some([3; 32]), true));
        assert!(PieceHashes::complete(layout, vec![[2; 32]]).is_none());
    }

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
