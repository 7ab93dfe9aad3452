//! The `Authorization` header any client of a peer port can send: judged without panic, and
//! never accepted unless it is a member's signature.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], &str, u64)| {
    let (header, path, now) = input;
    let secret = clyde_types::ClusterSecret::parse(b"fuzzing-secret-0123456789abcdefghij").expect("secret");
    let members = clyde_types::Membership::new(vec![secret]).expect("members");
    let verdict = members.verify(Some(header), "GET", path, now);
    if verdict.is_ok() {
        let canonical = members.authorization("GET", path, header_time(header));
        assert!(header.eq_ignore_ascii_case(canonical.as_bytes()), "accepted a header no member wrote");
    }
    let _ = clyde_types::ClusterSecret::parse(header);
});

fn header_time(header: &[u8]) -> u64 {
    let text = std::str::from_utf8(header).unwrap_or("");
    text.split("t=").nth(1).and_then(|r| r.split(',').next()).and_then(|t| t.parse().ok()).unwrap_or(0)
}
