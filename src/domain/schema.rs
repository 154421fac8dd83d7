//! The JSON schemas of the values the API checks, built from the constants the checks
//! themselves use (`crate::domain::values`): the OpenAPI document states exactly the
//! rules `Serial`, `Name`, `PortType` and `Ports` enforce, and a change to a rule changes
//! the document with it. The tests below hold the patterns to the checks.

use super::{values, PortType, Ports};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// The extension key [`crate::api::doc`] turns into `"not": {"const": ...}`, which utoipa's
/// schema types cannot express: a serial a client names may be anything the pattern allows
/// except the reserved word.
pub const NOT_CONST_EXTENSION: &str = "x-not-const";

/// `^[A-Za-z0-9._:-]{1,36}$`: the characters and length [`crate::domain::Serial`] accepts.
pub fn serial_pattern() -> String {
    // `-` last in the class, so it is a character and not a range.
    let (dash, rest): (String, String) =
        values::SERIAL_PUNCTUATION.chars().partition(|&c| c == '-');
    format!("^[A-Za-z0-9{rest}{dash}]{{1,{}}}$", values::MAX_SERIAL_LEN)
}

/// `^[ -~]{1,64}$`: printable ASCII, as [`crate::domain::Name`] accepts.
pub fn name_pattern() -> String {
    let (low, high) = (
        *values::NAME_BYTES.start() as char,
        *values::NAME_BYTES.end() as char,
    );
    format!("^[{low}-{high}]{{1,{}}}$", values::MAX_NAME_LEN)
}

fn serial_object() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(values::MAX_SERIAL_LEN))
        .pattern(Some(serial_pattern()))
}

/// A serial as the service returns it.
pub fn serial() -> Schema {
    serial_object()
        .description(Some(format!(
            "1 to {} characters from `A-Z a-z 0-9 {}`",
            values::MAX_SERIAL_LEN,
            spaced(values::SERIAL_PUNCTUATION)
        )))
        .into()
}

/// A serial a client names, in a body or a path: the serial rule, and not the reserved word.
pub fn named_serial() -> Schema {
    serial_object()
        .description(Some(format!(
            "1 to {} characters from `A-Z a-z 0-9 {}`, other than `{}`",
            values::MAX_SERIAL_LEN,
            spaced(values::SERIAL_PUNCTUATION),
            values::RESERVED_SERIAL
        )))
        .extensions(Some(
            utoipa::openapi::extensions::ExtensionsBuilder::new()
                .add(NOT_CONST_EXTENSION, values::RESERVED_SERIAL)
                .build(),
        ))
        .into()
}

fn spaced(chars: &str) -> String {
    chars
        .chars()
        .map(String::from)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn name() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(values::MAX_NAME_LEN))
        .pattern(Some(name_pattern()))
        .description(Some(format!(
            "1 to {} printable ASCII characters (0x20 to 0x7E)",
            values::MAX_NAME_LEN
        )))
        .into()
}

fn port_type_object() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(PortType::ALL.map(PortType::as_str)))
}

pub fn port_type() -> Schema {
    port_type_object().into()
}

/// A widget's ports: 1 to 3 distinct port types.
pub fn ports() -> Schema {
    ArrayBuilder::new()
        .items(port_type_object())
        .min_items(Some(1))
        .max_items(Some(Ports::MAX))
        .unique_items(true)
        .into()
}

/// A widget's `associations`: one key per port it has, its peer's serial or `null`.
pub fn associations() -> Schema {
    let mut object = ObjectBuilder::new()
        .schema_type(Type::Object)
        .min_properties(Some(1))
        .additional_properties(Some(
            utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
        ));
    for port in PortType::ALL {
        object = object.property(
            port.as_str(),
            serial_object().schema_type(SchemaType::from_iter([Type::String, Type::Null])),
        );
    }
    object.into()
}

/// The `serial_number` path parameter's schema ([`named_serial`]).
pub struct SerialParam;

impl PartialSchema for SerialParam {
    fn schema() -> RefOr<Schema> {
        named_serial().into()
    }
}

impl ToSchema for SerialParam {}

/// The `port_type` path parameter's schema ([`port_type`]).
pub struct PortTypeParam;

impl PartialSchema for PortTypeParam {
    fn schema() -> RefOr<Schema> {
        port_type().into()
    }
}

impl ToSchema for PortTypeParam {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Name, Serial};
    use regex::Regex;

    /// Strings near the rules' edges: every length around the limits, every byte class.
    fn samples(max: usize) -> Vec<String> {
        let mut rng = fastrand::Rng::with_seed(15);
        let alphabet: Vec<char> = (0u8..=0x7f)
            .map(char::from)
            .chain(['é', 'Í', '\u{80}', '\u{ff}', '\u{2028}'])
            .collect();
        let mut out = vec![values::RESERVED_SERIAL.to_owned()];
        for _ in 0..20_000 {
            let len = rng.usize(0..=max + 2);
            let favour_ascii = rng.bool();
            out.push(
                (0..len)
                    .map(|_| {
                        if favour_ascii {
                            rng.choice(['a', 'Z', '0', '.', '_', ':', '-', ' ', '~'])
                                .unwrap()
                        } else {
                            alphabet[rng.usize(..alphabet.len())]
                        }
                    })
                    .collect(),
            );
        }
        out
    }

    #[test]
    fn the_serial_pattern_accepts_exactly_what_the_check_accepts() {
        let pattern = Regex::new(&serial_pattern()).unwrap();
        for s in samples(values::MAX_SERIAL_LEN) {
            assert_eq!(
                pattern.is_match(&s),
                Serial::parse("s", &s).is_ok(),
                "{s:?} against {pattern}"
            );
            let named = pattern.is_match(&s) && s != values::RESERVED_SERIAL;
            assert_eq!(named, Serial::parse_named("s", &s).is_ok(), "{s:?}");
        }
    }

    #[test]
    fn the_name_pattern_accepts_exactly_what_the_check_accepts() {
        let pattern = Regex::new(&name_pattern()).unwrap();
        for s in samples(values::MAX_NAME_LEN) {
            assert_eq!(
                pattern.is_match(&s),
                Name::parse("n", &s).is_ok(),
                "{s:?} against {pattern}"
            );
        }
    }

    #[test]
    fn port_schemas_list_every_port_type_and_bound_the_set() {
        let ports = serde_json::to_value(ports()).unwrap();
        assert_eq!(ports["items"]["enum"], serde_json::json!(["P", "R", "Q"]));
        assert_eq!(
            (
                &ports["minItems"],
                &ports["maxItems"],
                &ports["uniqueItems"]
            ),
            (&1.into(), &3.into(), &true.into())
        );
        for port in ["P", "R", "Q"] {
            assert!(PortType::parse("p", port).is_ok());
        }
        for list in [&[][..], &[PortType::P, PortType::P]] {
            assert!(Ports::from_list("ports", list).is_err());
        }
    }
}
