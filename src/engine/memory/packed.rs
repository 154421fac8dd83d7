//! The map's compact form of a widget: one heap allocation holding the port bitmask, the
//! name and the peers as length-prefixed bytes, next to the version.
//!
//! Ten million widgets live in the map, so each byte of a widget is 10 MB of the process.
//! A [`Widget`] is ~150 bytes with up to five allocations of its own; packed, a widget with
//! 17-character serials and two peers is one 48-byte allocation besides papaya's entry.
//! The rules work on [`Widget`]s; the map packs on insert and unpacks on read.
//!
//! Layout of `bytes`: `ports` (the bitmask), `name_len`, `name`, then for each port the
//! widget has, in canonical order P, R, Q: `peer_len` (0 = free) and the peer's serial.
//! Lengths fit a byte: names are at most 64 bytes, serials at most 36.

use crate::domain::{Name, Ports, Serial, Widget, MAX_NAME_LEN, MAX_SERIAL_LEN};

const _: () = assert!(MAX_NAME_LEN <= u8::MAX as usize);
const _: () = assert!(MAX_SERIAL_LEN <= u8::MAX as usize);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedWidget {
    version: u64,
    bytes: Box<[u8]>,
}

impl PackedWidget {
    /// Packs a widget the rules made, or one that passed [`Widget::check`] (every load
    /// runs it first): the lengths then fit their bytes and every peer is on a port the
    /// widget has, which is all the packed form relies on.
    pub fn pack(widget: &Widget) -> Self {
        let len = |s: &str| u8::try_from(s.len()).expect("a checked name or serial fits a byte");
        let name = widget.name.as_str();
        let peers_len: usize = widget
            .ports
            .iter()
            .map(|p| 1 + widget.peer(p).map_or(0, |s| s.as_str().len()))
            .sum();
        let mut bytes = Vec::with_capacity(2 + name.len() + peers_len);
        bytes.push(widget.ports.bits());
        bytes.push(len(name));
        bytes.extend_from_slice(name.as_bytes());
        for port in widget.ports.iter() {
            let peer = widget.peer(port).map_or("", |s| s.as_str());
            bytes.push(len(peer));
            bytes.extend_from_slice(peer.as_bytes());
        }
        Self {
            version: widget.version,
            bytes: bytes.into_boxed_slice(),
        }
    }

    pub fn unpack(&self) -> Widget {
        let ports = Ports::from_bits(self.bytes[0]).expect("packed from a valid port set");
        let mut at = 1;
        let mut next = || {
            let len = usize::from(self.bytes[at]);
            let s =
                std::str::from_utf8(&self.bytes[at + 1..at + 1 + len]).expect("packed from a str");
            at += 1 + len;
            s
        };
        let name = Name::trusted(next());
        let mut peers = [None, None, None];
        for port in ports.iter() {
            let peer = next();
            if !peer.is_empty() {
                peers[port.index()] = Some(Serial::trusted(peer));
            }
        }
        Widget {
            name,
            ports,
            peers,
            version: self.version,
        }
    }

    /// The peer on each port, by [`crate::domain::PortType::index`], without unpacking.
    pub fn peers(&self) -> [Option<&str>; 3] {
        let ports = Ports::from_bits(self.bytes[0]).expect("packed from a valid port set");
        let mut at = 2 + usize::from(self.bytes[1]);
        let mut peers = [None, None, None];
        for port in ports.iter() {
            let len = usize::from(self.bytes[at]);
            if len > 0 {
                let peer = &self.bytes[at + 1..at + 1 + len];
                peers[port.index()] = Some(std::str::from_utf8(peer).expect("packed from a str"));
            }
            at += 1 + len;
        }
        peers
    }

    #[cfg(test)]
    pub fn version(&self) -> u64 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::PortType;

    fn widget(ports: &[PortType], peers: [Option<&str>; 3], version: u64) -> Widget {
        let mut w = Widget::new(
            Name::parse("name", &"n".repeat(MAX_NAME_LEN)).unwrap(),
            Ports::from_list("ports", ports).unwrap(),
        );
        for (i, peer) in peers.into_iter().enumerate() {
            w.peers[i] = peer.map(|s| Serial::parse("peer", s).unwrap());
        }
        w.version = version;
        w
    }

    #[test]
    fn round_trips_every_port_set_and_peer_pattern() {
        use PortType::*;
        let longest = "s".repeat(MAX_SERIAL_LEN);
        for ports in [&[P][..], &[R], &[Q], &[P, R], &[P, Q], &[R, Q], &[P, R, Q]] {
            for mask in 0u8..8 {
                let mut peers = [None, None, None];
                for p in ports {
                    if mask & (1 << p.index()) != 0 {
                        peers[p.index()] = Some(longest.as_str());
                    }
                }
                let w = widget(ports, peers, u64::MAX - 1);
                let packed = PackedWidget::pack(&w);
                assert_eq!(packed.unpack(), w, "{ports:?} {mask:b}");
                assert_eq!(packed.peers(), peers, "{ports:?} {mask:b}");
            }
        }
    }

    #[test]
    fn is_one_small_allocation() {
        let w = widget(
            &[PortType::P, PortType::R, PortType::Q],
            [Some("a"), None, Some("bc")],
            7,
        );
        let packed = PackedWidget::pack(&w);
        assert_eq!(packed.bytes.len(), 2 + MAX_NAME_LEN + 3 + 3);
        assert_eq!(packed.version(), 7);
        assert_eq!(std::mem::size_of::<PackedWidget>(), 24);
    }
}
