//! Sizes from flags (`--max-size 10GiB`): parsing never panics or overflows.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let _ = clyde_types::parse_size(input);
});
