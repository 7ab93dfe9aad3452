//! Where a peer's server is: the peer's IP as libp2p knows it, and the peer-server port it
//! announces in its identify agent version (`clyde/<version> peer-port/<port>`).

use std::net::{IpAddr, SocketAddr};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

/// The agent version this node announces.
pub(crate) fn agent_version(peer_port: u16) -> String {
    format!("clyde/{} peer-port/{peer_port}", env!("CARGO_PKG_VERSION"))
}

/// The peer-server port in a peer's agent version, if it is a Clyde agent.
pub fn parse_peer_port(agent_version: &str) -> Option<u16> {
    if !agent_version.starts_with("clyde/") {
        return None;
    }
    agent_version.split_whitespace().find_map(|word| word.strip_prefix("peer-port/")?.parse().ok())
}

/// The IP in a multiaddr, if it has one.
pub(crate) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// The address of a peer's server, always on an IP its libp2p connections come from: a
/// peer cannot send others to a host that is not its own. `connection_ips` are the remote
/// IPs of our connections to it and `listen` what it says it listens on. A connection IP
/// the peer also listens on is the best answer (on a node with many interfaces it is the
/// one that routes); else the connection's own IP. Loopback is one host: a peer on a
/// loopback connection may name any loopback address it listens on (agents side by side on
/// 127.0.0.x).
pub fn http_addr(connection_ips: &[IpAddr], listen: &[Multiaddr], peer_port: u16) -> Option<SocketAddr> {
    let listen_ips: Vec<IpAddr> = listen.iter().filter_map(ip_of).filter(|ip| !ip.is_unspecified()).collect();
    let on_loopback = connection_ips.iter().any(IpAddr::is_loopback);
    let ip = connection_ips
        .iter()
        .find(|ip| listen_ips.contains(ip))
        .or_else(|| listen_ips.iter().find(|ip| on_loopback && ip.is_loopback()))
        .or_else(|| connection_ips.first())?;
    Some(SocketAddr::new(*ip, peer_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    proptest::proptest! {
        #[test]
        fn any_agent_version_parses_without_panic_and_ports_round_trip(s in ".{0,80}", port in 0u16..) {
            let _ = parse_peer_port(&s);
            proptest::prop_assert_eq!(parse_peer_port(&agent_version(port)), Some(port));
        }
    }

    #[test]
    fn peer_port_comes_from_a_clyde_agent_version() {
        assert_eq!(parse_peer_port(&agent_version(30022)), Some(30022));
        assert_eq!(parse_peer_port("rust-libp2p/0.1 peer-port/1"), None);
        assert_eq!(parse_peer_port("clyde/0.1.0"), None);
        assert_eq!(parse_peer_port("clyde/0.1.0 peer-port/x"), None);
    }

    #[test]
    fn a_connection_ip_the_peer_listens_on_wins() {
        let listen = [ma("/ip4/127.0.0.1/tcp/1"), ma("/ip4/10.0.0.5/tcp/1"), ma("/ip4/172.17.0.1/tcp/1")];
        assert_eq!(http_addr(&[ip("10.0.0.5")], &listen, 30022), Some("10.0.0.5:30022".parse().unwrap()));
    }

    #[test]
    fn a_loopback_peer_may_name_its_loopback_listen_address() {
        let listen = [ma("/ip4/127.0.0.3/tcp/4001")];
        assert_eq!(http_addr(&[ip("127.0.0.1")], &listen, 7), Some("127.0.0.3:7".parse().unwrap()));
    }

    #[test]
    fn a_peer_cannot_send_others_to_an_address_it_does_not_connect_from() {
        // It claims to listen on another host's address: the connection's IP is used.
        let listen = [ma("/ip4/127.0.0.1/tcp/1"), ma("/ip4/10.1.2.3/tcp/1")];
        assert_eq!(http_addr(&[ip("192.168.0.9")], &listen, 7), Some("192.168.0.9:7".parse().unwrap()));
        let listen = [ma("/ip4/10.9.9.9/tcp/1")];
        assert_eq!(http_addr(&[ip("127.0.0.1")], &listen, 7), Some("127.0.0.1:7".parse().unwrap()));
        assert_eq!(http_addr(&[ip("10.0.0.7")], &[ma("/ip4/127.0.0.1/tcp/1")], 7), Some("10.0.0.7:7".parse().unwrap()));
    }

    proptest::proptest! {
        #[test]
        fn the_address_is_always_a_connection_ip_or_loopback_for_loopback(
            conn in proptest::collection::vec(proptest::prelude::any::<[u8; 4]>(), 1..3),
            listen in proptest::collection::vec(proptest::prelude::any::<[u8; 4]>(), 0..4),
        ) {
            let conn: Vec<IpAddr> = conn.into_iter().map(IpAddr::from).collect();
            let listen: Vec<Multiaddr> = listen.into_iter().map(|b| format!("/ip4/{}/tcp/1", std::net::Ipv4Addr::from(b)).parse().unwrap()).collect();
            let got = http_addr(&conn, &listen, 7).unwrap().ip();
            proptest::prop_assert!(conn.contains(&got) || (got.is_loopback() && conn.iter().any(IpAddr::is_loopback)));
        }
    }

    #[test]
    fn unspecified_listen_addresses_fall_back_to_the_connection() {
        let listen = [ma("/ip4/0.0.0.0/tcp/1")];
        assert_eq!(http_addr(&[ip("10.9.9.9")], &listen, 7), Some("10.9.9.9:7".parse().unwrap()));
        assert_eq!(http_addr(&[], &listen, 7), None);
    }
}
