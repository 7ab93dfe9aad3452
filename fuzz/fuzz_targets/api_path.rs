//! Mirror request paths and `ns` values: parsing never panics, and whatever parses names no
//! path outside the data dir.
#![no_main]

use clyde_types::{ApiPath, Resource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, Option<&str>)| {
    let (path, ns) = input;
    if let Ok(ApiPath::Content { registry, repository, resource }) = ApiPath::parse(path, ns) {
        assert!(!registry.as_str().contains('/') && !registry.as_str().contains(".."));
        assert!(repository.as_str().split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
        if let Resource::Blob(d) = resource {
            assert_eq!(d.to_string().parse::<clyde_types::Digest>().ok(), Some(d));
        }
    }
});
