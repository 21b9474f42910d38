//! The one-pass classifier the data path runs on every frame: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clonecluster::wire::parse_l2_l4(data);
});
