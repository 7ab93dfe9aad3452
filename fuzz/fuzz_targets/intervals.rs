//! Interval sets agree with a plain bitmap whatever the insertions.
#![no_main]

use clyde_types::IntervalSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|ops: Vec<(u8, u8)>| {
    let mut set = IntervalSet::new();
    let mut bits = [false; 512];
    for (start, len) in ops {
        let (start, end) = (u64::from(start), u64::from(start) + u64::from(len));
        set.insert(start..end);
        for b in &mut bits[start as usize..end as usize] {
            *b = true;
        }
    }
    for (i, b) in bits.iter().enumerate() {
        assert_eq!(set.contains(i as u64), *b);
    }
    assert_eq!(set.len(), bits.iter().filter(|b| **b).count() as u64);
});
