//! Raw bindings to the system libdpdk (22.11 LTS), generated at build time.
//!
//! Everything here is `unsafe` and untyped; the safe layer lives in the engine's `dataplane`
//! module, which is the only code allowed to use this crate. DPDK's `static inline` functions
//! (`rte_eth_rx_burst`, `rte_pktmbuf_free`, ...) are reachable through the C wrappers that
//! bindgen generates, under their C names (the Rust declarations link to the generated `NAME__extern` symbols).

#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case)]
#![allow(
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    missing_debug_implementations
)]
#![allow(rustdoc::all, unsafe_op_in_unsafe_fn)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
