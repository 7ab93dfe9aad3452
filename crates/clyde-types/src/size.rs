//! Byte sizes as operators write them: `1073741824`, `512MiB`, `10G`, `1.5GiB`.

/// Why a size is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {0:?}: a number of bytes with an optional unit (K, M, G, T as powers of 1000; KiB, MiB, GiB, TiB as powers of 1024)"
)]
pub struct SizeError(String);

/// Parses a size in bytes; units are case-insensitive, a trailing `B` is optional.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.chars().take(40).collect());
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let scale: u64 = match unit.trim_end_matches('b') {
        "" => 1,
        "k" => 1000,
        "m" => 1000_u64.pow(2),
        "g" => 1000_u64.pow(3),
        "t" => 1000_u64.pow(4),
        "ki" => 1 << 10,
        "mi" => 1 << 20,
        "gi" => 1 << 30,
        "ti" => 1 << 40,
        _ => return Err(err()),
    };
    if unit.matches('b').count() > 1 || number.is_empty() || number.len() > 20 {
        return Err(err());
    }
    match number.split_once('.') {
        None => number.parse::<u64>().ok().and_then(|n| n.checked_mul(scale)).ok_or_else(err),
        Some((whole, frac)) => {
            if scale == 1 || frac.is_empty() || frac.contains('.') || frac.len() > 9 {
                return Err(err());
            }
            let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| err())? };
            let frac_value: u64 = frac.parse().map_err(|_| err())?;
            let frac_bytes = (frac_value as u128 * scale as u128 / 10u128.pow(frac.len() as u32)) as u64;
            whole.checked_mul(scale).and_then(|w| w.checked_add(frac_bytes)).ok_or_else(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_decimal_and_binary() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("10G"), Ok(10_000_000_000));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size(" 2 kb "), Ok(2000));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn malformed_sizes_are_rejected() {
        for bad in ["", "G", "-1", "1.5", "1..5G", "10X", "10GiBB", "99999999999999999999999", "20000000TiB", "1.G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "[0-9.]{0,24}[kKmMgGtTiIbB ]{0,4}") {
            let _ = parse_size(&s);
        }
    }
}
