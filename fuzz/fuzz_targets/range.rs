//! `Range` headers: parsing never panics, and resolved ranges (one or a set) lie inside the blob.
#![no_main]

use clyde_types::RangeRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, u64)| {
    let (header, size) = input;
    if let Ok(r) = RangeRequest::parse(header).and_then(|req| req.resolve(size)) {
        assert!(r.start < r.end && r.end <= size);
        assert_eq!(r.len(), r.end - r.start);
    }
    if let Ok(parts) = RangeRequest::parse_set(header).and_then(|set| RangeRequest::resolve_set(&set, size)) {
        assert!(!parts.is_empty() && parts.len() <= clyde_types::MAX_RANGES);
        assert!(parts.iter().all(|r| r.start < r.end && r.end <= size));
    }
});
