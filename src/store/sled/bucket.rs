//! Several widgets to one sled value: a widget lives in the bucket its serial hashes to,
//! and a bucket is one sled entry holding all of its widgets.
//!
//! Why: sled keeps, for every leaf it holds in memory, a list of where its deltas lie in
//! the log (32 bytes a delta, cut back only when the leaf is rewritten at 10 deltas), so
//! its memory under random writes grows with the number of leaves. One widget to an entry,
//! 10 M widgets took ~430 MiB more once writes had reached every leaf; four to an entry
//! held sled at ~200 MiB in all, under writes too (BENCHMARKS.md, "One allocation per
//! widget" and "Several widgets to a sled value").
//!
//! A bucket's key is [`PREFIX`] and the top `bits` bits of the CRC-32 of the serial, big
//! endian; its value is a run of entries `[serial length: u8][serial][widget length: u16
//! LE][widget, bincode]`, in no particular order, each serial once. A store records its
//! `bits` when it is created, so a store keeps its layout whatever a later build defaults to.

use crate::domain::{Serial, Widget};

/// The first byte of every bucket key: below every serial's first byte (serials are
/// `A-Z a-z 0-9 . _ : -`), above the `\0` of the store's own keys.
pub const PREFIX: u8 = 1;

/// Bits of bucket number for a new store: 2 M buckets, about five widgets to a bucket at
/// 10 M widgets, one at 2 M.
pub const DEFAULT_BITS: u32 = 21;

pub type Key = [u8; 5];

/// Which bucket a serial belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    bits: u32,
}

impl Layout {
    /// A layout of `2^bits` buckets; `bits` from 1 to 32.
    pub fn new(bits: u32) -> Option<Self> {
        (1..=32).contains(&bits).then_some(Self { bits })
    }

    pub fn bits(self) -> u32 {
        self.bits
    }

    /// How many buckets there are.
    pub fn buckets(self) -> u64 {
        1 << self.bits
    }

    /// The number of the bucket `serial` belongs in, below [`Layout::buckets`].
    pub fn number(self, serial: &str) -> u32 {
        crc32fast::hash(serial.as_bytes()) >> (32 - self.bits)
    }

    pub fn key(self, serial: &str) -> Key {
        key_of(self.number(serial))
    }
}

/// The key of bucket number `bucket`; keys sort as their numbers do.
pub fn key_of(bucket: u32) -> Key {
    let mut key = [PREFIX; 5];
    key[1..].copy_from_slice(&bucket.to_be_bytes());
    key
}

/// A bucket key as a store error names it.
pub fn describe(key: &[u8]) -> String {
    match key {
        [PREFIX, n @ ..] if n.len() == 4 => {
            format!(
                "bucket {}",
                u32::from_be_bytes(n.try_into().expect("4 bytes"))
            )
        }
        _ => String::from_utf8_lossy(key).into_owned(),
    }
}

/// The entries of a bucket value, as (serial, encoded widget); an error says where the
/// value stops making sense.
pub fn entries(value: &[u8]) -> impl Iterator<Item = Result<(&str, &[u8]), String>> {
    let mut rest = value;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let entry = split_entry(rest).map(|(serial, widget, tail)| {
            rest = tail;
            (serial, widget)
        });
        if entry.is_err() {
            rest = &[];
        }
        Some(entry)
    })
}

fn split_entry(value: &[u8]) -> Result<(&str, &[u8], &[u8]), String> {
    let truncated = || format!("an entry is cut short ({} bytes left)", value.len());
    let (&serial_len, rest) = value.split_first().ok_or_else(truncated)?;
    let (serial, rest) = rest
        .split_at_checked(usize::from(serial_len))
        .ok_or_else(truncated)?;
    let serial = std::str::from_utf8(serial).map_err(|e| format!("a serial: {e}"))?;
    let (len, rest) = rest.split_at_checked(2).ok_or_else(truncated)?;
    let len = u16::from_le_bytes(len.try_into().expect("2 bytes"));
    let (widget, rest) = rest
        .split_at_checked(usize::from(len))
        .ok_or_else(truncated)?;
    Ok((serial, widget, rest))
}

/// Decodes and checks one entry of the bucket `key` of `layout`.
pub fn decode(
    layout: Layout,
    key: &[u8],
    serial: &str,
    widget: &[u8],
) -> Result<(Serial, Widget), String> {
    let serial = Serial::parse("serial", serial).map_err(|e| e.to_string())?;
    let home = layout.key(serial.as_str());
    if home != key {
        return Err(format!("widget {serial} belongs in {}", describe(&home)));
    }
    let (decoded, used): (Widget, usize) =
        bincode::serde::decode_from_slice(widget, bincode::config::standard())
            .map_err(|e| format!("widget {serial}: {e}"))?;
    if used != widget.len() {
        return Err(format!(
            "widget {serial}: {} bytes after its encoding",
            widget.len() - used
        ));
    }
    decoded
        .check(&serial)
        .map_err(|e| format!("widget {serial}: {e}"))?;
    Ok((serial, decoded))
}

/// A widget's new state in a bucket: the widget, or out of the bucket.
pub enum Put<'a> {
    Widget(&'a Widget),
    Remove,
}

/// The bucket value `old` (`None`: no such entry yet) with `changes` made to it, each
/// serial once; `None` when no widget is left in it. Entries not changed are copied as
/// they are, never decoded.
pub fn merge(old: Option<&[u8]>, changes: &[(&str, Put<'_>)]) -> Result<Option<Vec<u8>>, String> {
    let mut value = Vec::with_capacity(old.map_or(0, <[u8]>::len) + 64 * changes.len());
    for entry in old.into_iter().flat_map(entries) {
        let (serial, widget) = entry?;
        if !changes.iter().any(|(changed, _)| *changed == serial) {
            append(&mut value, serial, widget);
        }
    }
    for (serial, put) in changes {
        match put {
            Put::Widget(w) => push_entry(&mut value, serial, |out| {
                bincode::serde::encode_into_std_write(w, out, bincode::config::standard())
                    .map(drop)
                    .expect("encoding a widget into memory")
            }),
            Put::Remove => {}
        }
    }
    Ok((!value.is_empty()).then_some(value))
}

/// Appends the entry of `serial` and its encoded widget to a bucket value that has none.
pub fn append(value: &mut Vec<u8>, serial: &str, widget: &[u8]) {
    push_entry(value, serial, |out| out.extend_from_slice(widget));
}

/// Appends one entry, the widget written by `widget`.
fn push_entry(value: &mut Vec<u8>, serial: &str, widget: impl FnOnce(&mut Vec<u8>)) {
    let serial_len = u8::try_from(serial.len()).expect("a serial is at most 36 bytes");
    value.push(serial_len);
    value.extend_from_slice(serial.as_bytes());
    let at = value.len();
    value.extend_from_slice(&[0, 0]);
    widget(value);
    let len = u16::try_from(value.len() - at - 2).expect("a widget encodes in under 64 KiB");
    value[at..at + 2].copy_from_slice(&len.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Name, PortType, Ports};

    fn widget(name: &str) -> Widget {
        Widget::new(
            Name::parse("name", name).unwrap(),
            Ports::from_list("ports", &[PortType::P, PortType::Q]).unwrap(),
        )
    }

    fn decoded(layout: Layout, key: &[u8], value: &[u8]) -> Vec<(String, Widget)> {
        entries(value)
            .map(|e| {
                let (serial, widget) = e.unwrap();
                let (serial, widget) = decode(layout, key, serial, widget).unwrap();
                (serial.as_str().to_owned(), widget)
            })
            .collect()
    }

    #[test]
    fn a_merge_replaces_removes_and_adds_only_what_it_names() {
        // Two buckets, and three serials that share one.
        let layout = Layout::new(1).unwrap();
        let key = layout.key("a");
        assert_eq!([layout.key("d"), layout.key("e")], [key, key]);
        let (a, d, e) = (widget("a"), widget("d"), widget("e"));
        let first = merge(None, &[("a", Put::Widget(&a)), ("d", Put::Widget(&d))])
            .unwrap()
            .unwrap();
        let renamed = widget("a2");
        let second = merge(
            Some(&first),
            &[
                ("a", Put::Widget(&renamed)),
                ("d", Put::Remove),
                ("e", Put::Widget(&e)),
            ],
        )
        .unwrap()
        .unwrap();
        let mut got = decoded(layout, &key, &second);
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(got, [("a".into(), renamed), ("e".into(), e)]);
        let emptied = merge(Some(&second), &[("a", Put::Remove), ("e", Put::Remove)]).unwrap();
        assert_eq!(emptied, None, "nothing left, no value");
    }

    #[test]
    fn damage_is_an_error_never_a_panic() {
        let layout = Layout::new(8).unwrap();
        let w = widget("n");
        let value = merge(None, &[("ab", Put::Widget(&w))]).unwrap().unwrap();
        let key = layout.key("ab");
        for cut in 0..value.len() {
            let err = entries(&value[..cut]).find_map(Result::err);
            if cut > 0 {
                assert!(err.unwrap().contains("cut short"), "cut at {cut}");
            }
            assert!(merge(Some(&value[..cut]), &[]).is_err() || cut == 0);
        }
        let elsewhere = (0..)
            .map(|i| format!("s{i}"))
            .find(|s| layout.key(s) != key)
            .unwrap();
        let err = decode(layout, &key, &elsewhere, &value[5..]).unwrap_err();
        assert!(err.contains("belongs in bucket"), "{err}");
        let mut padded = value[5..].to_vec();
        padded.push(0);
        let err = decode(layout, &key, "ab", &padded).unwrap_err();
        assert!(err.contains("1 bytes after"), "{err}");
        assert_eq!(Layout::new(0), None);
        assert_eq!(Layout::new(33), None);
        assert_eq!(
            Layout::new(32).unwrap().key("ab")[1..],
            crc32fast::hash(b"ab").to_be_bytes()
        );
    }
}
