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
}
