//! `Range` headers: parsing never panics, and a resolved range lies inside the blob.
#![no_main]

use clyde_types::RangeRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, u64)| {
    let (header, size) = input;
    if let Ok(r) = RangeRequest::parse(header).and_then(|req| req.resolve(size)) {
        assert!(r.start < r.end && r.end <= size);
        assert_eq!(r.len(), r.end - r.start);
    }
});
