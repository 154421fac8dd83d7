//! What a write does to one widget: its post-image ([`Change`], what the WAL logs and every
//! backend applies) and what about the widget changed ([`Mark`], what a durable store needs
//! to write only the rows that changed).

use super::values::{Serial, ValidationError};
use super::widget::Widget;
use serde::{Deserialize, Serialize};

/// One widget's post-image: its whole new state, or its deletion. Applying a change twice
/// is harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Put { serial: Serial, widget: Widget },
    Delete { serial: Serial },
}

impl Change {
    pub fn serial(&self) -> &Serial {
        match self {
            Change::Put { serial, .. } | Change::Delete { serial } => serial,
        }
    }

    /// The widget after the change (`None`: deleted).
    pub fn after(&self) -> Option<&Widget> {
        match self {
            Change::Put { widget, .. } => Some(widget),
            Change::Delete { .. } => None,
        }
    }

    /// [`Widget::check`] for a change decoded rather than made by the rules.
    pub fn check(&self) -> Result<(), ValidationError> {
        match self {
            Change::Put { serial, widget } => widget.check(serial),
            Change::Delete { serial } => Serial::check("serial", serial.as_str()),
        }
    }
}

/// What changed about one widget since the durable store last took it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mark {
    /// The widget row itself: created, deleted, or deleted and created again.
    pub row: bool,
    /// Bitmask (by [`super::PortType::index`]) of the ports whose peer changed.
    pub ports: u8,
}

impl Mark {
    /// The bit [`Mark::to_bits`] sets for a changed row, above the three port bits.
    const ROW_BIT: u8 = 1 << 3;
    /// The port bits of [`Mark::to_bits`].
    const PORT_BITS: u8 = 0b111;

    /// What `change` changes about a widget whose state before it was `before`.
    pub fn of(before: Option<&Widget>, change: &Change) -> Mark {
        Mark::between(peers(before), peers(change.after()))
    }

    /// What changed between two states of a widget, known by their peers on each port
    /// (`None`: the widget does not exist).
    pub fn between(before: Option<[Option<&str>; 3]>, after: Option<[Option<&str>; 3]>) -> Mark {
        let mut ports = 0;
        for i in 0..3 {
            let a = before.and_then(|p| p[i]);
            let b = after.and_then(|p| p[i]);
            if a != b {
                ports |= 1 << i;
            }
        }
        Mark {
            row: before.is_none() || after.is_none(),
            ports,
        }
    }

    /// Both marks' changes.
    pub fn merge(&mut self, other: Mark) {
        self.row |= other.row;
        self.ports |= other.ports;
    }

    /// One byte: the port bits, and [`Mark::ROW_BIT`] for a changed row (how Redis mode
    /// keeps a mark in its dirty set).
    pub fn to_bits(self) -> u8 {
        (if self.row { Self::ROW_BIT } else { 0 }) | (self.ports & Self::PORT_BITS)
    }

    /// The mark [`Mark::to_bits`] made, or `None` for bits it never sets.
    pub fn from_bits(bits: u8) -> Option<Mark> {
        (bits & !(Self::ROW_BIT | Self::PORT_BITS) == 0).then_some(Mark {
            row: bits & Self::ROW_BIT != 0,
            ports: bits & Self::PORT_BITS,
        })
    }
}

/// A widget's peers as [`Mark::between`] takes them.
pub fn peers(widget: Option<&Widget>) -> Option<[Option<&str>; 3]> {
    widget.map(|w| w.peers.each_ref().map(|p| p.as_ref().map(Serial::as_str)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Name, PortType, Ports};

    #[test]
    fn marks_name_exactly_what_changed() {
        let s = |x: &str| Serial::parse("s", x).unwrap();
        let new = Widget::new(
            Name::parse("n", "w").unwrap(),
            Ports::from_list("p", &PortType::ALL).unwrap(),
        );
        let put = |w: &Widget| Change::Put {
            serial: s("a"),
            widget: w.clone(),
        };
        assert_eq!(
            Mark::of(None, &put(&new)),
            Mark {
                row: true,
                ports: 0
            }
        );
        let mut plugged = new.clone();
        plugged.peers[PortType::R.index()] = Some(s("b"));
        assert_eq!(
            Mark::of(Some(&new), &put(&plugged)),
            Mark {
                row: false,
                ports: 0b010
            }
        );
        let mut replugged = plugged.clone();
        replugged.peers[PortType::R.index()] = Some(s("c"));
        replugged.peers[PortType::Q.index()] = Some(s("d"));
        assert_eq!(
            Mark::of(Some(&plugged), &put(&replugged)),
            Mark {
                row: false,
                ports: 0b110
            }
        );
        assert_eq!(Mark::of(Some(&plugged), &put(&plugged)), Mark::default());
        let delete = Change::Delete { serial: s("a") };
        assert_eq!(
            Mark::of(Some(&replugged), &delete),
            Mark {
                row: true,
                ports: 0b110
            }
        );
    }

    #[test]
    fn bits_round_trip_and_refuse_what_they_never_hold() {
        for row in [false, true] {
            for ports in 0..8 {
                let mark = Mark { row, ports };
                assert_eq!(Mark::from_bits(mark.to_bits()), Some(mark));
            }
        }
        assert_eq!(
            Mark {
                row: true,
                ports: 0b101
            }
            .to_bits(),
            0b1101
        );
        assert_eq!(Mark::from_bits(0b1_0000), None);
    }

    #[test]
    fn check_refuses_what_the_rules_never_make() {
        let s = |x: &str| Serial::parse("s", x).unwrap();
        let mut w = Widget::new(
            Name::parse("n", "w").unwrap(),
            Ports::from_list("p", &[PortType::P]).unwrap(),
        );
        assert_eq!(
            Change::Put {
                serial: s("a"),
                widget: w.clone()
            }
            .check(),
            Ok(())
        );
        w.peers[PortType::P.index()] = Some(s("a"));
        let err = Change::Put {
            serial: s("a"),
            widget: w.clone(),
        }
        .check()
        .unwrap_err();
        assert!(err.reason.contains("itself"), "{err}");
        w.peers[PortType::P.index()] = None;
        w.peers[PortType::Q.index()] = Some(s("b"));
        let err = w.check(&s("a")).unwrap_err();
        assert!(err.reason.contains("port Q"), "{err}");
    }
}
