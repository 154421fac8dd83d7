//! The map's compact form of a widget: its serial, version, port bitmask, name and peers in
//! one heap allocation, behind one thin pointer.
//!
//! Ten million widgets live in the map, so each byte of a widget is 10 MB of the process.
//! A [`Widget`] is ~150 bytes with up to five allocations of its own; packed, a seeded
//! widget (15-character serials, two peers) is one 64-byte allocation, and papaya's entry
//! for it holds only the pointer (8 bytes). With the serial and version beside the entry
//! instead (a 24-byte inline serial, the version, a boxed slice: a 48-byte entry and a
//! 40-byte allocation) each widget cost 16 bytes more, 150 MiB at 10 M widgets.
//! The rules work on [`Widget`]s; the map packs on insert and unpacks on read.
//!
//! Layout: `serial_len`, `serial`, `version` (8 bytes, little-endian), `ports` (the
//! bitmask), `name_len`, `name`, then for each port the widget has, in canonical order P,
//! R, Q: `peer_len` (0 = free) and the peer's serial. Lengths fit a byte: names are at most
//! 64 bytes, serials at most 36. The allocation's length is not stored: [`len_of`] reads it
//! off the lengths inside, which is what keeps the pointer thin.

use crate::domain::{Name, Ports, Serial, Widget, MAX_NAME_LEN, MAX_SERIAL_LEN};
use std::ptr::NonNull;

const _: () = assert!(MAX_NAME_LEN <= u8::MAX as usize);
const _: () = assert!(MAX_SERIAL_LEN <= u8::MAX as usize);

/// Where the version starts, after a serial of `serial_len` bytes.
const fn version_at(serial_len: usize) -> usize {
    1 + serial_len
}

/// The length of a packed widget, read off its length bytes: `byte(i)` is its `i`th byte,
/// asked only for offsets the lengths before it say are inside.
fn len_of(byte: impl Fn(usize) -> u8) -> usize {
    let mut at = version_at(usize::from(byte(0))) + 8;
    let ports = byte(at);
    at += 1;
    at += 1 + usize::from(byte(at));
    for _ in 0..ports.count_ones() {
        at += 1 + usize::from(byte(at));
    }
    at
}

/// A packed widget: owns its bytes as a `Box<[u8]>` would, through a pointer to their first
/// byte.
pub struct PackedWidget(NonNull<u8>);

// SAFETY: a `PackedWidget` owns its bytes and never changes them after packing, as a
// `Box<[u8]>` (which is `Send` and `Sync`) would.
unsafe impl Send for PackedWidget {}
unsafe impl Sync for PackedWidget {}

impl PackedWidget {
    /// Packs a widget the rules made, or one that passed [`Widget::check`] (every load
    /// runs it first): the lengths then fit their bytes and every peer is on a port the
    /// widget has, which is all the packed form relies on.
    pub fn pack(serial: &Serial, widget: &Widget) -> Self {
        let len = |s: &str| u8::try_from(s.len()).expect("a checked name or serial fits a byte");
        let (serial, name) = (serial.as_str(), widget.name.as_str());
        let peers_len: usize = widget
            .ports
            .iter()
            .map(|p| 1 + widget.peer(p).map_or(0, |s| s.as_str().len()))
            .sum();
        let mut bytes = Vec::with_capacity(1 + serial.len() + 8 + 2 + name.len() + peers_len);
        bytes.push(len(serial));
        bytes.extend_from_slice(serial.as_bytes());
        bytes.extend_from_slice(&widget.version.to_le_bytes());
        bytes.push(widget.ports.bits());
        bytes.push(len(name));
        bytes.extend_from_slice(name.as_bytes());
        for port in widget.ports.iter() {
            let peer = widget.peer(port).map_or("", |s| s.as_str());
            bytes.push(len(peer));
            bytes.extend_from_slice(peer.as_bytes());
        }
        Self::from_boxed(bytes.into_boxed_slice())
    }

    /// Takes ownership of packed bytes, keeping only the pointer to the first.
    fn from_boxed(bytes: Box<[u8]>) -> Self {
        assert_eq!(
            len_of(|i| bytes[i]),
            bytes.len(),
            "packed bytes say their length"
        );
        let first = Box::into_raw(bytes).cast::<u8>();
        Self(NonNull::new(first).expect("a box is never null"))
    }

    fn bytes(&self) -> &[u8] {
        let first = self.0.as_ptr().cast_const();
        // SAFETY: `first` is the first byte of a live `Box<[u8]>` this value owns (made by
        // `from_boxed`, which checked that its length is what `len_of` reads), and `len_of`
        // reads only bytes its lengths put inside it.
        unsafe {
            let len = len_of(|i| *first.add(i));
            std::slice::from_raw_parts(first, len)
        }
    }

    /// The serial, the version and the bytes after them (`ports`, `name_len`, `name`, the
    /// peers), from one reading of the lengths.
    fn parts(&self) -> (&str, u64, &[u8]) {
        let bytes = self.bytes();
        let at = version_at(usize::from(bytes[0]));
        let serial = std::str::from_utf8(&bytes[1..at]).expect("packed from a str");
        let version = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        (serial, version, &bytes[at + 8..])
    }

    /// The serial alone, read off its length byte: the map hashes and compares entries by
    /// it at every look-up and insert, where [`Self::parts`] would first walk every length
    /// inside to find the whole widget's.
    pub fn serial(&self) -> &str {
        let first = self.0.as_ptr().cast_const();
        // SAFETY: a packed widget starts with its serial's length and then the serial, and
        // `from_boxed` checked that the allocation is as long as its lengths say, so these
        // bytes are inside the allocation this value owns. They are UTF-8 because
        // `from_boxed` is private and takes only the bytes `pack` copied from a `Serial`'s
        // `str`, or a clone's copy of them, and a packed widget never changes its bytes.
        let serial = unsafe {
            let len = usize::from(*first);
            std::str::from_utf8_unchecked(std::slice::from_raw_parts(first.add(1), len))
        };
        debug_assert_eq!(serial, self.parts().0);
        serial
    }

    #[cfg(test)]
    pub fn version(&self) -> u64 {
        self.parts().1
    }

    pub fn unpack(&self) -> Widget {
        let (_, version, body) = self.parts();
        let ports = Ports::from_bits(body[0]).expect("packed from a valid port set");
        let mut at = 1;
        let mut next = || {
            let len = usize::from(body[at]);
            let s = std::str::from_utf8(&body[at + 1..at + 1 + len]).expect("packed from a str");
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
            version,
        }
    }

    /// The peer on each port, by [`crate::domain::PortType::index`], without unpacking.
    pub fn peers(&self) -> [Option<&str>; 3] {
        let (_, _, body) = self.parts();
        let ports = Ports::from_bits(body[0]).expect("packed from a valid port set");
        let mut at = 2 + usize::from(body[1]);
        let mut peers = [None, None, None];
        for port in ports.iter() {
            let len = usize::from(body[at]);
            if len > 0 {
                let peer = &body[at + 1..at + 1 + len];
                peers[port.index()] = Some(std::str::from_utf8(peer).expect("packed from a str"));
            }
            at += 1 + len;
        }
        peers
    }
}

impl Drop for PackedWidget {
    fn drop(&mut self) {
        let len = self.bytes().len();
        // SAFETY: rebuilds the `Box<[u8]>` that `from_boxed` took apart, with its length;
        // this value owned it and is gone after this.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.0.as_ptr(), len)) });
    }
}

impl Clone for PackedWidget {
    fn clone(&self) -> Self {
        Self::from_boxed(self.bytes().into())
    }
}

impl PartialEq for PackedWidget {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for PackedWidget {}

impl std::fmt::Debug for PackedWidget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWidget")
            .field("serial", &self.serial())
            .field("widget", &self.unpack())
            .finish()
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
        for serial in ["a", longest.as_str()] {
            let serial = Serial::parse("serial", serial).unwrap();
            for ports in [&[P][..], &[R], &[Q], &[P, R], &[P, Q], &[R, Q], &[P, R, Q]] {
                for mask in 0u8..8 {
                    let mut peers = [None, None, None];
                    for p in ports {
                        if mask & (1 << p.index()) != 0 {
                            peers[p.index()] = Some(longest.as_str());
                        }
                    }
                    let w = widget(ports, peers, u64::MAX - 1);
                    let packed = PackedWidget::pack(&serial, &w);
                    assert_eq!(packed.unpack(), w, "{ports:?} {mask:b}");
                    assert_eq!(packed.peers(), peers, "{ports:?} {mask:b}");
                    assert_eq!(packed.serial(), serial.as_str());
                    let copy = packed.clone();
                    drop(packed);
                    assert_eq!(copy.unpack(), w, "a clone owns bytes of its own");
                }
            }
        }
    }

    #[test]
    fn is_one_small_allocation_behind_a_thin_pointer() {
        let w = widget(
            &[PortType::P, PortType::R, PortType::Q],
            [Some("a"), None, Some("bc")],
            7,
        );
        let packed = PackedWidget::pack(&Serial::parse("s", "xyz").unwrap(), &w);
        assert_eq!(packed.bytes().len(), 1 + 3 + 8 + 2 + MAX_NAME_LEN + 3 + 3);
        assert_eq!(packed.version(), 7);
        assert_eq!(std::mem::size_of::<PackedWidget>(), 8);
        assert_eq!(std::mem::size_of::<Option<PackedWidget>>(), 8);
    }

    #[test]
    fn equal_only_when_every_byte_is() {
        let w = widget(&[PortType::P], [None, None, None], 1);
        let a = Serial::parse("s", "a").unwrap();
        let packed = PackedWidget::pack(&a, &w);
        assert_eq!(packed, PackedWidget::pack(&a, &w));
        let mut later = w.clone();
        later.version = 2;
        assert_ne!(packed, PackedWidget::pack(&a, &later));
        assert_ne!(
            packed,
            PackedWidget::pack(&Serial::parse("s", "b").unwrap(), &w)
        );
    }
}
