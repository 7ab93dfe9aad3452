//! `Accept` headers, as any client of the mirror or a peer sends them: never a panic; the kind
//! is `None` exactly when every manifest type is admitted; what goes upstream always names a
//! manifest type.
#![no_main]

use clyde_types::media;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (accept, media_type) = input;
    let _ = media::accepts(Some(accept), media_type);
    let all = [media::OCI_INDEX, media::OCI_MANIFEST, media::DOCKER_MANIFEST_LIST, media::DOCKER_MANIFEST];
    let kind = media::accept_kind(Some(accept));
    assert_eq!(kind.is_none(), all.iter().all(|t| media::accepts(Some(accept), t)));
    let upstream = media::upstream_accept(Some(accept));
    assert!(all.iter().any(|t| upstream.contains(t)));
});
