//! The widget domain, shared by every backend: the value types and their validation
//! ([`values`]), the widget record and its one validator ([`widget`]), what a write does to
//! a widget ([`change`]) and the association rules as pure functions over a transaction
//! ([`rules`]), and the JSON schemas of the values, built from the rules ([`schema`]).
//!
//! Nothing here does I/O. A backend reads current state through [`rules::Tx`], the rules
//! compute every widget a change touches, and the backend makes those post-images durable.

pub mod change;
pub mod rules;
pub mod schema;
pub mod values;
pub mod widget;

pub use change::{Change, Mark};
pub use rules::{
    Associate, Associated, Create, Delete, DomainError, Free, Rule, StateView, Touched, Tx,
};
pub use values::{Name, PortType, Ports, Serial, ValidationError, MAX_NAME_LEN, MAX_SERIAL_LEN};
pub use widget::{Widget, WidgetView};
