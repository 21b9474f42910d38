//! ARP and neighbour-discovery answers for the cluster address.

use super::*;

#[test]
fn arp_answer_is_the_kernels_reply_but_for_the_ethernet_source() {
    let frames = capture();
    let is_arp = |f: &Vec<u8>, op: u8| f[12..14] == [8, 6] && f[21] == op;
    let request = frames
        .iter()
        .find(|f| is_arp(f, 1) && f[38..42] == [198, 18, 0, 1])
        .unwrap();
    let kernel = frames
        .iter()
        .find(|f| is_arp(f, 2) && f[28..32] == [198, 18, 0, 1])
        .unwrap();
    let ours = answer(&mut alone(), request).expect("the only node answers");
    assert_eq!(ours[6..12], NODE_MAC.0, "Ethernet source is the node MAC");
    assert_eq!(ours[..6], kernel[..6]);
    assert_eq!(
        ours[12..],
        kernel[12..],
        "ARP payload byte for byte, cluster MAC inside"
    );
    assert_eq!(ours[22..28], CLUSTER_MAC.0);
}

#[test]
fn neighbour_advert_is_the_kernels_but_for_the_ethernet_source() {
    let frames = capture();
    let icmp6 = |f: &Vec<u8>, t: u8| f[12..14] == [0x86, 0xdd] && f[20] == 58 && f[54] == t;
    let cluster6: Ipv6Addr = "2001:2::1".parse().unwrap();
    let ns = frames
        .iter()
        .find(|f| icmp6(f, 135) && f[62..78] == cluster6.octets() && f[22..38] != [0; 16])
        .unwrap();
    let kernel = frames
        .iter()
        .find(|f| icmp6(f, 136) && f[62..78] == cluster6.octets())
        .unwrap();
    let ours = answer(&mut alone(), ns).expect("the only node answers");
    assert_eq!(ours[6..12], NODE_MAC.0);
    assert_eq!(ours[..6], kernel[..6]);
    assert_eq!(
        ours[12..],
        kernel[12..],
        "IPv6 + NA + target link-layer option, checksum"
    );
}

#[test]
fn only_the_designated_node_answers_arp() {
    let frames = capture();
    let request = frames
        .iter()
        .find(|f| f[12..14] == [8, 6] && f[21] == 1 && f[38..42] == [198, 18, 0, 1])
        .unwrap();
    let members: Vec<Member> = (1..=7).map(|i| Member::new(i, 100).unwrap()).collect();
    let mut nodes = cluster(&members);
    let answers = nodes.iter_mut().filter_map(|p| answer(p, request)).count();
    assert_eq!(answers, 1);
}
