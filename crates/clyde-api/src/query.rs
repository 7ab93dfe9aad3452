//! The query string: only `ns` matters to the mirror.

/// The percent-decoded value of query parameter `name`, if present.
pub(crate) fn param(query: Option<&str>, name: &str) -> Result<Option<String>, &'static str> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            return decode(value).map(Some);
        }
    }
    Ok(None)
}

fn decode(s: &str) -> Result<String, &'static str> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or("truncated percent-escape in query")?;
                let hex = std::str::from_utf8(hex).map_err(|_| "bad percent-escape in query")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad percent-escape in query")?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "query is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_ns() {
        assert_eq!(param(Some("ns=reg.example%3A5000"), "ns"), Ok(Some("reg.example:5000".into())));
        assert_eq!(param(Some("a=1&ns=x"), "ns"), Ok(Some("x".into())));
        assert_eq!(param(Some("a=1"), "ns"), Ok(None));
        assert!(param(Some("ns=%zz"), "ns").is_err());
        assert!(param(Some("ns=%4"), "ns").is_err());
    }

    proptest::proptest! {
        /// Any query a client sends: never a panic, and an encoded value comes back as it was.
        #[test]
        fn any_query_parses_without_panic_and_values_round_trip(query in ".{0,200}", value in "[a-z0-9.:-]{0,40}") {
            let _ = param(Some(&query), "ns");
            let encoded: String = value.bytes().map(|b| format!("%{b:02X}")).collect();
            let with = format!("{query}&ns={encoded}");
            let first = param(Some(&with), "ns");
            if !query.split('&').any(|p| p.split_once('=').unwrap_or((p, "")).0 == "ns") {
                proptest::prop_assert_eq!(first, Ok(Some(value)));
            }
        }
    }
}
