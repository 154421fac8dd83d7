//! Validated value types: serial numbers, names, port types and port sets.
//!
//! A value of these types is valid by construction when it came through `parse`; the rules
//! are the ones in `docs/API.md` ("Values"). A value decoded from the WAL or a store (serde)
//! is not checked by decoding: every load runs [`crate::domain::Widget::check`] on what it
//! decoded before the engine takes it.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::fmt;

/// Longest serial number accepted (a UUID string is 36 characters).
pub const MAX_SERIAL_LEN: usize = 36;
/// The characters a serial may hold besides ASCII letters and digits.
pub const SERIAL_PUNCTUATION: &str = "._:-";
/// The one serial a client may not name: `/widgets/associations` is the association
/// route, so no widget can be addressed there.
pub const RESERVED_SERIAL: &str = "associations";
/// Longest widget name accepted.
pub const MAX_NAME_LEN: usize = 64;
/// The lowest and highest byte of a name (printable ASCII).
pub const NAME_BYTES: std::ops::RangeInclusive<u8> = 0x20..=0x7e;

/// A rule broken by a request field; `field` names it for the error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A widget's serial number: 1 to 36 characters from `A-Z a-z 0-9 . _ : -`.
///
/// Held inline up to 24 bytes (most serials), so cloning one, which the write path does
/// for every widget it touches, does not allocate.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Serial(CompactString);

impl Serial {
    pub fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
        Self::check(field, s)?;
        Ok(Self(s.into()))
    }

    /// The rules of [`Serial::parse`], without building a serial.
    pub fn check(field: &str, s: &str) -> Result<(), ValidationError> {
        if s.is_empty() || s.len() > MAX_SERIAL_LEN {
            return Err(ValidationError::new(
                field,
                format!("must be 1 to {MAX_SERIAL_LEN} characters long"),
            ));
        }
        let allowed =
            |b: u8| b.is_ascii_alphanumeric() || SERIAL_PUNCTUATION.as_bytes().contains(&b);
        if !s.bytes().all(allowed) {
            return Err(ValidationError::new(
                field,
                "may only contain the characters A-Z a-z 0-9 . _ : -",
            ));
        }
        Ok(())
    }

    /// [`Serial::parse`] for a serial a client names (in a body or a path), which may not
    /// be [`RESERVED_SERIAL`]. Stored widgets are loaded with [`Serial::parse`]: one made
    /// before the word was reserved still loads.
    pub fn parse_named(field: &str, s: &str) -> Result<Self, ValidationError> {
        let serial = Self::parse(field, s)?;
        if s == RESERVED_SERIAL {
            return Err(ValidationError::new(
                field,
                format!("{RESERVED_SERIAL:?} is reserved (it is the association route)"),
            ));
        }
        Ok(serial)
    }

    /// A serial read back from the engine's own packed state, which held only parsed
    /// serials: not checked again.
    pub(crate) fn trusted(s: &str) -> Self {
        debug_assert!(Self::parse("serial", s).is_ok(), "{s:?}");
        Self(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A serial as the WAL's decoder reads it: unchecked, as serde's derive would build
    /// it. Replay checks every decoded change whole ([`crate::domain::Change::check`]).
    pub(crate) fn decoded(s: &str) -> Self {
        Self(s.into())
    }
}

impl Borrow<str> for Serial {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A widget's name: 1 to 64 printable ASCII characters (0x20 to 0x7E).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Name(CompactString);

impl Name {
    pub fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
        Self::check(field, s)?;
        Ok(Self(s.into()))
    }

    /// The rules of [`Name::parse`], without building a name.
    pub fn check(field: &str, s: &str) -> Result<(), ValidationError> {
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            return Err(ValidationError::new(
                field,
                format!("must be 1 to {MAX_NAME_LEN} characters long"),
            ));
        }
        if !s.bytes().all(|b| NAME_BYTES.contains(&b)) {
            return Err(ValidationError::new(
                field,
                "may only contain printable ASCII characters (0x20 to 0x7E)",
            ));
        }
        Ok(())
    }

    /// A name read back from the engine's own packed state, which held only parsed
    /// names: not checked again.
    pub(crate) fn trusted(s: &str) -> Self {
        debug_assert!(Self::parse("name", s).is_ok(), "{s:?}");
        Self(s.into())
    }

    /// A name as the WAL's decoder reads it: unchecked, like [`Serial::decoded`].
    pub(crate) fn decoded(s: &str) -> Self {
        Self(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One of the three port types. The discriminant is the port's index in a widget's
/// association array and its bit in [`Ports`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum PortType {
    P = 0,
    R = 1,
    Q = 2,
}

impl PortType {
    /// Every port type, in the canonical order P, R, Q.
    pub const ALL: [PortType; 3] = [PortType::P, PortType::R, PortType::Q];

    pub fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
        match s {
            "P" => Ok(PortType::P),
            "R" => Ok(PortType::R),
            "Q" => Ok(PortType::Q),
            _ => Err(ValidationError::new(
                field,
                format!("unknown port type {s:?}: expected one of \"P\", \"R\", \"Q\""),
            )),
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PortType::P => "P",
            PortType::R => "R",
            PortType::Q => "Q",
        }
    }
}

/// A non-empty set of port types, as a bitmask (P = 1, R = 2, Q = 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ports(u8);

impl Ports {
    /// Most port types a widget has: every one.
    pub const MAX: usize = PortType::ALL.len();

    /// Builds a port set from a request's list: 1 to 3 distinct port types.
    pub fn from_list(field: &str, list: &[PortType]) -> Result<Self, ValidationError> {
        if list.is_empty() || list.len() > Self::MAX {
            return Err(ValidationError::new(field, "must list 1 to 3 port types"));
        }
        let mut bits = 0u8;
        for port in list {
            let bit = 1 << port.index();
            if bits & bit != 0 {
                return Err(ValidationError::new(
                    field,
                    format!("lists port {} twice", port.as_str()),
                ));
            }
            bits |= bit;
        }
        Ok(Self(bits))
    }

    /// The bitmask form, 1..=7, as stored.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Rebuilds a set from its stored bitmask; `None` unless it is 1..=7.
    pub fn from_bits(bits: u8) -> Option<Self> {
        (1..=7).contains(&bits).then_some(Self(bits))
    }

    /// A set as the WAL's decoder reads it, any bitmask: unchecked, like
    /// [`Serial::decoded`].
    pub(crate) fn decoded(bits: u8) -> Self {
        Self(bits)
    }

    pub fn contains(self, port: PortType) -> bool {
        self.0 & (1 << port.index()) != 0
    }

    /// The ports in canonical order P, R, Q.
    pub fn iter(self) -> impl Iterator<Item = PortType> {
        PortType::ALL.into_iter().filter(move |p| self.contains(*p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_rules() {
        for ok in [
            "1",
            "123",
            "a.b_c:d-E",
            "550e8400-e29b-41d4-a716-446655440000",
        ] {
            assert_eq!(Serial::parse("s", ok).unwrap().as_str(), ok);
        }
        let too_long = "x".repeat(MAX_SERIAL_LEN + 1);
        for bad in ["", "a b", "a/b", "é", too_long.as_str(), "a\0"] {
            let err = Serial::parse("serial_number", bad).unwrap_err();
            assert_eq!(err.field, "serial_number", "{bad:?}");
        }
    }

    #[test]
    fn name_rules() {
        assert!(Name::parse("name", " ~").is_ok());
        assert!(Name::parse("name", &"n".repeat(MAX_NAME_LEN)).is_ok());
        for bad in [
            String::new(),
            "n".repeat(MAX_NAME_LEN + 1),
            "tab\t".into(),
            "ü".into(),
        ] {
            assert_eq!(Name::parse("name", &bad).unwrap_err().field, "name");
        }
    }

    #[test]
    fn ports_rules() {
        use PortType::*;
        let ports = Ports::from_list("ports", &[Q, P]).unwrap();
        assert_eq!(ports.iter().collect::<Vec<_>>(), vec![P, Q]);
        assert_eq!(ports.bits(), 0b101);
        assert!(Ports::from_list("ports", &[]).is_err());
        assert!(Ports::from_list("ports", &[P, P])
            .unwrap_err()
            .reason
            .contains("twice"));
        assert!(Ports::from_list("ports", &[P, R, Q, P]).is_err());
        assert_eq!(Ports::from_bits(0), None);
        assert_eq!(Ports::from_bits(8), None);
        assert_eq!(
            PortType::parse("port_type", "p").unwrap_err().field,
            "port_type"
        );
    }
}
