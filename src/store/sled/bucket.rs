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
//! `bits`, chosen at its first write for the widgets it then says it holds
//! ([`Layout::for_widgets`]), and changed only by a compaction that gives a crowded store
//! twice the buckets ([`Layout::grown`]): each old bucket's widgets go to the two new
//! buckets that cover its hashes, so the buckets keep their order.

use crate::domain::{Serial, Widget};

/// The first byte of every bucket key: below every serial's first byte (serials are
/// `A-Z a-z 0-9 . _ : -`), above the `\0` of the store's own keys.
pub const PREFIX: u8 = 1;

/// Widgets to a bucket a new store is laid out for: at least this many, and fewer than
/// twice as many. A widget's entry takes ~65 bytes, so a bucket value is ~260-520 bytes;
/// at 10 M widgets that is 2^21 buckets, the layout the 10 M memory figures were measured
/// with. Far fewer buckets at 10 M grew sled's memory (2^17: ~1.4 GB against ~1.1 GB),
/// and more buckets than widgets (2^21 at 1 M) made a flush write nearly one bucket a
/// widget, ~4x the store's CPU of 2^17 (BENCHMARKS.md, "Where target 1's CPU goes by
/// thread", and "A store laid out for its size").
const WIDGETS_PER_BUCKET: f64 = 4.0;

/// The fewest buckets a store is laid out with: a store whose first write holds a few
/// widgets gets room for ~60,000 before it is crowded.
pub const MIN_BITS: u32 = 12;

/// The most buckets a store lays itself out with (~270 M widgets at four a bucket).
pub const MAX_BITS: u32 = 26;

/// A store whose buckets average more bytes than this (~15 widgets, twice what
/// [`Layout::for_widgets`] gives at most) is copied into twice the buckets by a
/// compaction, which starts after the write that crowded it (see [`Layout::grown`]). So a
/// store that grows keeps eight to sixteen widgets a bucket: at 10 M, 2^20 or 2^21
/// buckets, both measured within the memory target (BENCHMARKS.md, "A store laid out for
/// its size").
pub const CROWDED_BYTES: u64 = 1024;

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

    /// The layout for a store of `widgets`: [`WIDGETS_PER_BUCKET`] to twice that to a
    /// bucket (the most buckets that leave at least that many), from 2^[`MIN_BITS`] to
    /// 2^[`MAX_BITS`] buckets.
    pub fn for_widgets(widgets: u64) -> Self {
        let bits = (widgets as f64 / WIDGETS_PER_BUCKET).log2().floor();
        // A negative or infinite logarithm saturates, and the clamp takes care of it.
        Self {
            bits: (bits as u32).clamp(MIN_BITS, MAX_BITS),
        }
    }

    /// The layout a store holding `live_bytes` of buckets in this one should be copied into
    /// at its next compaction: twice the buckets once they average over [`CROWDED_BYTES`]
    /// (up to 2^[`MAX_BITS`]), else this one.
    pub fn grown(self, live_bytes: u64) -> Self {
        if self.bits >= MAX_BITS || live_bytes / self.buckets() <= CROWDED_BYTES {
            return self;
        }
        Self {
            bits: self.bits + 1,
        }
    }

    /// The value a store records its layout as (under its own key).
    pub fn recorded(self) -> [u8; 8] {
        u64::from(self.bits).to_be_bytes()
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
        (order(serial) >> (32 - self.bits)) as u32
    }

    pub fn key(self, serial: &str) -> Key {
        key_of(self.number(serial))
    }
}

/// An order of serials that every layout's buckets follow (their numbers are the top bits
/// of this), for writing a store in key order before it has a layout.
pub fn order(serial: &str) -> u64 {
    u64::from(crc32fast::hash(serial.as_bytes()))
}

/// The number of the bucket `key` names, if it is a bucket key.
pub fn number_of(key: &[u8]) -> Option<u32> {
    match key {
        [PREFIX, n @ ..] => Some(u32::from_be_bytes(n.try_into().ok()?)),
        _ => None,
    }
}

/// The entries of the bucket value `value` sorted into the buckets of `to` they belong in,
/// by bucket number, each a bucket value; an error says where `value` stops making sense.
pub fn split(value: &[u8], to: Layout) -> Result<std::collections::BTreeMap<u32, Vec<u8>>, String> {
    let mut buckets = std::collections::BTreeMap::<u32, Vec<u8>>::new();
    for entry in entries(value) {
        let (serial, widget) = entry?;
        append(
            buckets.entry(to.number(serial)).or_default(),
            serial,
            widget,
        );
    }
    Ok(buckets)
}

/// The key of bucket number `bucket`; keys sort as their numbers do.
pub fn key_of(bucket: u32) -> Key {
    let mut key = [PREFIX; 5];
    key[1..].copy_from_slice(&bucket.to_be_bytes());
    key
}

/// A bucket key as a store error names it.
pub fn describe(key: &[u8]) -> String {
    match number_of(key) {
        Some(n) => format!("bucket {n}"),
        None => String::from_utf8_lossy(key).into_owned(),
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
    fn a_store_is_laid_out_for_four_to_eight_widgets_a_bucket_and_grows_when_crowded() {
        let bits = |widgets| Layout::for_widgets(widgets).bits();
        assert_eq!(
            bits(10_000_000),
            21,
            "the layout of the 10 M memory figures"
        );
        assert_eq!(bits(1_000_000), 17);
        assert_eq!(
            [bits(524_288), bits(1_048_575)],
            [17, 17],
            "four to eight a bucket"
        );
        assert_eq!([bits(0), bits(1), bits(32_767)], [MIN_BITS; 3]);
        assert_eq!(bits(u64::MAX), MAX_BITS);

        let layout = Layout::new(MIN_BITS).unwrap();
        let crowded = CROWDED_BYTES * layout.buckets();
        assert_eq!(layout.grown(crowded), layout, "at the limit, not over it");
        assert_eq!(
            layout.grown(crowded + layout.buckets()).bits(),
            MIN_BITS + 1
        );
        let top = Layout::new(MAX_BITS).unwrap();
        assert_eq!(top.grown(u64::MAX), top, "no more than the most buckets");
        // Grown from 1 M widgets of ~65 bytes, it has 2^20 buckets at 10 M: ~9.5 widgets.
        let mut grown = Layout::for_widgets(1_000_000);
        for widgets in (1_000_000..=10_000_000).step_by(100_000) {
            grown = grown.grown(widgets * 65);
        }
        assert_eq!(grown.bits(), 20);
    }

    #[test]
    fn a_bucket_splits_into_the_buckets_that_cover_its_hashes_in_key_order() {
        let (from, to) = (Layout::new(3).unwrap(), Layout::new(5).unwrap());
        let w = widget("n");
        let serials: Vec<String> = (0..200).map(|i| format!("s{i}")).collect();
        let home = from.key(&serials[0]);
        let mine: Vec<(&str, Put)> = (serials.iter())
            .filter(|s| from.key(s) == home)
            .map(|s| (s.as_str(), Put::Widget(&w)))
            .collect();
        let value = merge(None, &mine).unwrap().unwrap();
        let buckets = split(&value, to).unwrap();
        let first = u32::from(home[4]) << 2;
        assert!(buckets.keys().all(|n| (first..first + 4).contains(n)));
        assert!(buckets.len() > 1, "{} buckets", buckets.len());
        let mut got: Vec<String> = (buckets.iter())
            .flat_map(|(&n, value)| decoded(to, &key_of(n), value))
            .map(|(serial, _)| serial)
            .collect();
        got.sort();
        let mut expected: Vec<String> = mine.iter().map(|(s, _)| s.to_string()).collect();
        expected.sort();
        assert_eq!(
            got, expected,
            "every widget once, in the bucket it belongs in"
        );
        assert!(
            (serials.iter()).all(|s| to.number(s) as u64 >> 2 == from.number(s) as u64
                && order(s) >> 27 == u64::from(to.number(s))),
            "a layout's buckets follow the serials' order"
        );
        assert!(split(&value[..value.len() - 1], to)
            .unwrap_err()
            .contains("cut short"));
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
