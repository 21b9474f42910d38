//! The shared test fixtures: real captured frames ([`frames`]), builders of synthetic frames
//! with valid checksums ([`build`]), pcap files ([`pcap`]) and the binaries Cargo built
//! ([`built_binary`]).
//!
//! Compiled only for the crate's own unit tests and under the `testkit` feature, which the
//! integration tests, the benches and the lab crate's tests turn on (the engine binary never
//! does). It owns test data and builders only: it must never hold engine logic, and its
//! checksums are computed here, independently of `wire::checksum`, so that a test does not share
//! a bug with the code it checks.

pub mod build;
pub mod frames;
pub mod pcap;

use std::path::{Path, PathBuf};

/// A binary that Cargo built into the same target directory as the running test executable
/// (`target/<profile>/deps/NAME-HASH` runs, `target/<profile>/NAME` is looked for), for tests of
/// another package that cannot ask Cargo for it. Panics with how to build it if it is missing.
pub fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe.parent().unwrap_or(Path::new(".")).to_owned();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "the binary `{name}` is not at {} (beside this test's target directory); build it \
         first: `cargo build --workspace --all-targets --locked` (scripts/test.sh does)",
        path.display()
    );
    path
}
