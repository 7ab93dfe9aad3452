//! A peer's piece list: decoding never panics, and what decodes encodes back to the same bytes.
#![no_main]

use clyde_types::{PieceHashes, PieceLayout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u16, u8, &[u8])| {
    let (size, piece, bytes) = input;
    let layout = PieceLayout::new(u64::from(size), u64::from(piece.max(1)));
    if let Ok(list) = PieceHashes::decode(bytes, layout) {
        assert_eq!(list.encode(), bytes);
    }
});
