//! Which bytes of a blob to ask of which peer, when several peers hold it complete.
//!
//! A blob that one peer sends arrives at the speed of that peer's uplink. When several
//! complete holders are known, the transfer cuts what nobody holds or fetches yet into
//! stripes and keeps a bounded number of stripe requests in flight, each to the holder with
//! the fewest of this blob's requests: a faster holder finishes its stripes sooner and gets
//! more of them, so the blob arrives at about the sum of the holders' uplinks. Stripes are
//! claimed in offset order, so the bytes a streaming reader needs next come first.
//!
//! Pure functions, tested without sockets; [`crate::transfer`] runs them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;

use clyde_types::IntervalSet;

use crate::transfer::ClaimView;

/// Bytes asked of one peer in one request.
pub const STRIPE: u64 = 4 * 1024 * 1024;
/// Stripe requests in flight per holder.
pub const PER_HOLDER: usize = 3;
/// Stripe requests in flight per blob, whatever the number of holders.
pub const MAX_IN_FLIGHT: usize = 16;

/// Stripe requests a blob with `holders` complete holders keeps in flight.
pub fn in_flight(holders: usize) -> usize {
    (holders * PER_HOLDER).clamp(1, MAX_IN_FLIGHT)
}

/// The next ranges to claim: the first bytes that are neither written nor claimed, cut at
/// `stripe` bytes, as many as `slots` (free request slots) allows.
pub fn plan_stripes(
    size: u64,
    written: &IntervalSet,
    claims: &[ClaimView],
    stripe: u64,
    slots: usize,
) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for gap in crate::transfer::plan_fill(size, written, claims) {
        let mut start = gap.start;
        while start < gap.end && out.len() < slots {
            let end = (start + stripe.max(1)).min(gap.end);
            out.push(start..end);
            start = end;
        }
        if out.len() >= slots {
            break;
        }
    }
    out
}

/// A running request not worth splitting: the rest of it arrives soon anyway.
pub const MIN_SPLIT: u64 = 1024 * 1024;

/// The end game: when every byte is claimed and request slots are free, the claim with the
/// most bytes still to come gives up its second half to a new request (to another holder),
/// so the last stripes do not leave holders idle while one slow request finishes. Returns
/// the claim's index and where it now ends; `None` when no claim has `min` bytes or more
/// left past the bytes being written. The cut falls on a multiple of `align` (a piece
/// boundary, so each piece comes from one holder and a bad one is pinned on it) when one
/// lies inside the rest; else in the middle.
pub fn plan_split(claims: &[ClaimView], min: u64, align: u64) -> Option<(usize, u64)> {
    let (index, from, end) = claims
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.cursor.max(c.reserved), c.end))
        .max_by_key(|(_, from, end)| end.saturating_sub(*from))?;
    let left = end.saturating_sub(from);
    if left < min.max(2) {
        return None;
    }
    let (mid, align) = (from + left / 2, align.max(1));
    let (up, down) = (mid.div_ceil(align) * align, mid / align * align);
    let at = match (up < end, down > from) {
        (true, true) if up - mid <= mid - down => up,
        (_, true) => down,
        (true, false) => up,
        (false, false) => mid,
    };
    Some((index, at))
}

/// `holders` ordered for the next request: fewest requests of this blob in flight first;
/// ties keep the holders' order (the lookup's, which differs from node to node).
pub fn by_load(holders: &[SocketAddr], load: &HashMap<SocketAddr, usize>) -> Vec<SocketAddr> {
    let mut ordered = holders.to_vec();
    ordered.sort_by_key(|h| load.get(h).copied().unwrap_or(0));
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(spans: &[Range<u64>]) -> IntervalSet {
        spans.iter().cloned().collect()
    }

    #[test]
    fn stripes_fill_the_free_slots_in_offset_order() {
        let claims = [ClaimView { cursor: 0, reserved: 0, end: 10, ..Default::default() }];
        let plan = plan_stripes(100, &set(&[30..40]), &claims, 8, 4);
        assert_eq!(plan, vec![10..18, 18..26, 26..30, 40..48]);
    }

    #[test]
    fn no_slot_no_stripe_and_nothing_left_nothing_planned() {
        assert!(plan_stripes(100, &IntervalSet::new(), &[], 8, 0).is_empty());
        assert!(plan_stripes(100, &set(&[0..100]), &[], 8, 4).is_empty());
        assert_eq!(plan_stripes(5, &IntervalSet::new(), &[], 8, 4), vec![0..5]);
    }

    #[test]
    fn the_end_game_splits_the_claim_with_the_most_left() {
        let claims = [
            ClaimView { cursor: 0, reserved: 0, end: 10, ..Default::default() },
            ClaimView { cursor: 20, reserved: 40, end: 100, ..Default::default() },
            ClaimView { cursor: 100, reserved: 100, end: 150, ..Default::default() },
        ];
        // 60 bytes left past the reservation of the second: it ends at 70 now.
        assert_eq!(plan_split(&claims, 8, 1), Some((1, 70)));
        // Nothing worth splitting.
        assert_eq!(plan_split(&claims, 100, 1), None);
        assert_eq!(plan_split(&[], 8, 1), None);
        assert_eq!(plan_split(&[ClaimView { cursor: 5, reserved: 10, end: 10, ..Default::default() }], 1, 1), None);
        // On a piece boundary when one lies inside the rest, the nearest to the middle.
        assert_eq!(plan_split(&claims, 8, 16), Some((1, 64)));
        assert_eq!(plan_split(&claims, 8, 1000), Some((1, 70)));
    }

    #[test]
    fn the_least_loaded_holder_is_asked_first() {
        let [a, b, c] = [1, 2, 3].map(|n| SocketAddr::from(([10, 0, 0, n], 30022)));
        let load = HashMap::from([(a, 2), (b, 0), (c, 1)]);
        assert_eq!(by_load(&[a, b, c], &load), vec![b, c, a]);
        assert_eq!(by_load(&[a, b], &HashMap::new()), vec![a, b]);
    }

    #[test]
    fn requests_in_flight_grow_with_holders_up_to_a_cap() {
        assert_eq!(in_flight(0), 1);
        assert_eq!(in_flight(4), 12);
        assert_eq!(in_flight(100), MAX_IN_FLIGHT);
    }
}
