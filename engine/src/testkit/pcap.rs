//! Pcap files for tests: the captures in `tests/fixtures`, read and written whole.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The path of `tests/fixtures/NAME` in the repository.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Every frame of a pcap file, in order; panics with the path if it cannot be read.
pub fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = pcap_file::pcap::PcapReader::new(file)
        .unwrap_or_else(|e| panic!("{}: not a pcap file: {e}", path.display()));
    let mut frames = Vec::new();
    while let Some(pkt) = reader.next_packet() {
        let pkt = pkt.unwrap_or_else(|e| panic!("{}: bad packet: {e}", path.display()));
        frames.push(pkt.data.into_owned());
    }
    frames
}

/// Writes `frames` as a pcap file, one microsecond apart.
pub fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let file = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut w = pcap_file::pcap::PcapWriter::new(file).expect("pcap writer");
    for (i, f) in frames.iter().enumerate() {
        let pkt =
            pcap_file::pcap::PcapPacket::new(Duration::from_micros(i as u64), f.len() as u32, f);
        w.write_packet(&pkt)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
