//! Image references typed by operators: parsing never panics, and what parses prints back
//! to a reference that parses to the same value.
#![no_main]

use clyde_types::ImageRef;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Ok(r) = ImageRef::parse(input) {
        assert!(r.repository.as_str().split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
        assert_eq!(ImageRef::parse(&r.to_string()), Ok(r));
    }
});
