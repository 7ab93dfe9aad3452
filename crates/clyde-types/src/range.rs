//! HTTP `Range` requests (RFC 9110 §14) of the `bytes` unit: one range, or several
//! ([`RangeRequest::parse_set`], answered with `multipart/byteranges`).

use std::ops::Range;

/// A syntactically valid single byte-range request, before the size is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// `bytes=first-last` (inclusive).
    Bounded { first: u64, last: u64 },
    /// `bytes=first-`.
    From { first: u64 },
    /// `bytes=-len`: the last `len` bytes.
    Suffix { len: u64 },
}

/// Why a `Range` header cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("malformed Range header; expected bytes=FIRST-LAST, bytes=FIRST- or bytes=-SUFFIX")]
    Malformed,
    #[error("too many ranges in one request (at most {MAX_RANGES})")]
    Multiple,
    #[error("range is outside the blob of {size} bytes")]
    Unsatisfiable { size: u64 },
}

/// A resolved, satisfiable byte range: `start..end` of a blob of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
    pub size: u64,
}

/// Longest `Range` header accepted (a lazy puller's multi-range requests fit easily).
const MAX_RANGE_HEADER: usize = 16 * 1024;
/// Most ranges in one request.
pub const MAX_RANGES: usize = 256;

impl RangeRequest {
    /// Parses a `Range` header value of one range.
    pub fn parse(value: &str) -> Result<Self, RangeError> {
        let mut set = Self::parse_set(value)?;
        if set.len() > 1 {
            return Err(RangeError::Multiple);
        }
        set.pop().ok_or(RangeError::Malformed)
    }

    /// Parses a `Range` header value of one or more comma-separated ranges, in order.
    pub fn parse_set(value: &str) -> Result<Vec<Self>, RangeError> {
        if value.len() > MAX_RANGE_HEADER {
            return Err(RangeError::Malformed);
        }
        let spec = value.trim().strip_prefix("bytes=").ok_or(RangeError::Malformed)?;
        let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
        if parts.len() > MAX_RANGES {
            return Err(RangeError::Multiple);
        }
        parts.into_iter().map(Self::parse_one).collect()
    }

    fn parse_one(spec: &str) -> Result<Self, RangeError> {
        let (first, last) = spec.trim().split_once('-').ok_or(RangeError::Malformed)?;
        let number = |s: &str| -> Result<u64, RangeError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RangeError::Malformed);
            }
            s.parse().map_err(|_| RangeError::Malformed)
        };
        match (first.trim(), last.trim()) {
            ("", len) => Ok(Self::Suffix { len: number(len)? }),
            (first, "") => Ok(Self::From { first: number(first)? }),
            (first, last) => {
                let (first, last) = (number(first)?, number(last)?);
                if last < first {
                    return Err(RangeError::Malformed);
                }
                Ok(Self::Bounded { first, last })
            }
        }
    }

    /// The satisfiable ranges of a set, in the order asked (RFC 9110 §14.2: the others are
    /// ignored); `Unsatisfiable` when none is.
    pub fn resolve_set(set: &[Self], size: u64) -> Result<Vec<ByteRange>, RangeError> {
        let resolved: Vec<ByteRange> = set.iter().filter_map(|r| r.resolve(size).ok()).collect();
        if resolved.is_empty() {
            return Err(RangeError::Unsatisfiable { size });
        }
        Ok(resolved)
    }

    /// The first byte this request selects, when that does not depend on the size.
    pub fn first_byte(self) -> Option<u64> {
        match self {
            Self::Bounded { first, .. } | Self::From { first } => Some(first),
            Self::Suffix { .. } => None,
        }
    }

    /// The bytes this request selects of a blob of `size` bytes.
    pub fn resolve(self, size: u64) -> Result<ByteRange, RangeError> {
        let unsatisfiable = RangeError::Unsatisfiable { size };
        let (start, end) = match self {
            Self::Bounded { first, last } => (first, last.saturating_add(1).min(size)),
            Self::From { first } => (first, size),
            Self::Suffix { len } => (size.saturating_sub(len), size),
        };
        if start >= size || start >= end {
            return Err(unsatisfiable);
        }
        Ok(ByteRange { start, end, size })
    }
}

impl ByteRange {
    /// The whole blob.
    pub fn full(size: u64) -> Self {
        Self { start: 0, end: size, size }
    }

    /// Number of bytes selected.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether no byte is selected.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Whether this is the whole blob.
    pub fn is_full(&self) -> bool {
        self.start == 0 && self.end == self.size
    }

    /// The `Content-Range` header value for a `206` answer.
    pub fn content_range(&self) -> String {
        format!("bytes {}-{}/{}", self.start, self.end - 1, self.size)
    }

    /// As a half-open std range.
    pub fn as_range(&self) -> Range<u64> {
        self.start..self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(RangeRequest::parse("bytes=0-9"), Ok(RangeRequest::Bounded { first: 0, last: 9 }));
        assert_eq!(RangeRequest::parse("bytes=5-"), Ok(RangeRequest::From { first: 5 }));
        assert_eq!(RangeRequest::parse("bytes=-5"), Ok(RangeRequest::Suffix { len: 5 }));
        assert_eq!(RangeRequest::parse("bytes=0-1,4-5"), Err(RangeError::Multiple));
        assert_eq!(
            RangeRequest::parse_set("bytes=100-199, 300000-300099,-5"),
            Ok(vec![
                RangeRequest::Bounded { first: 100, last: 199 },
                RangeRequest::Bounded { first: 300000, last: 300099 },
                RangeRequest::Suffix { len: 5 }
            ])
        );
        assert_eq!(RangeRequest::parse_set("bytes=0-1,,4-5"), Err(RangeError::Malformed));
        let many = format!("bytes={}", vec!["0-1"; MAX_RANGES + 1].join(","));
        assert_eq!(RangeRequest::parse_set(&many), Err(RangeError::Multiple));
        for bad in [
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "items=0-1",
            "bytes=9-1",
            "bytes=+1-2",
            "bytes=0-99999999999999999999999",
        ] {
            assert_eq!(RangeRequest::parse(bad), Err(RangeError::Malformed), "{bad}");
        }
    }

    #[test]
    fn resolves_against_size() {
        let r = RangeRequest::parse("bytes=0-99").unwrap().resolve(10).unwrap();
        assert_eq!((r.start, r.end), (0, 10));
        assert_eq!(r.content_range(), "bytes 0-9/10");
        let r = RangeRequest::parse("bytes=-3").unwrap().resolve(10).unwrap();
        assert_eq!((r.start, r.end), (7, 10));
        let r = RangeRequest::parse("bytes=-30").unwrap().resolve(10).unwrap();
        assert_eq!((r.start, r.end), (0, 10));
    }

    #[test]
    fn range_past_end_is_unsatisfiable() {
        assert_eq!(RangeRequest::parse("bytes=10-").unwrap().resolve(10), Err(RangeError::Unsatisfiable { size: 10 }));
        assert_eq!(RangeRequest::parse("bytes=-0").unwrap().resolve(10), Err(RangeError::Unsatisfiable { size: 10 }));
        assert!(RangeRequest::parse("bytes=0-0").unwrap().resolve(0).is_err());
    }

    #[test]
    fn a_set_keeps_its_satisfiable_parts_in_order() {
        let set = RangeRequest::parse_set("bytes=50-59,200-,0-4").unwrap();
        let parts = RangeRequest::resolve_set(&set, 100).unwrap();
        assert_eq!(parts.iter().map(|r| (r.start, r.end)).collect::<Vec<_>>(), vec![(50, 60), (0, 5)]);
        let set = RangeRequest::parse_set("bytes=200-,300-400").unwrap();
        assert_eq!(RangeRequest::resolve_set(&set, 100), Err(RangeError::Unsatisfiable { size: 100 }));
    }

    proptest::proptest! {
        #[test]
        fn resolved_ranges_are_inside(s in "bytes=[0-9]{0,4}-[0-9]{0,4}", size in 0u64..20000) {
            if let Ok(r) = RangeRequest::parse(&s).and_then(|req| req.resolve(size)) {
                proptest::prop_assert!(r.start < r.end && r.end <= size);
            }
        }
    }
}
