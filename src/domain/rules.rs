//! The association rules as pure functions: create, delete (freeing every peer), associate
//! (re-plugging frees the old peers) and free a port.
//!
//! A write ([`Create`], [`Delete`], [`Associate`], [`Free`], each a [`Rule`]) runs against
//! a [`Tx`]: reads go through the transaction to the state underneath, writes stay in the
//! transaction. The transaction's [`Change`]s are the
//! post-images of every widget the command touched, which is what a backend makes durable
//! as one atomic step. Every backend shares these rules, so they answer alike.

use super::change::Change;
use super::values::{Name, PortType, Ports, Serial};
use super::widget::{Widget, WidgetView};

/// Read access to the current state a command validates against.
pub trait StateView {
    fn get(&self, serial: &Serial) -> Option<Widget>;
}

/// A command's reads and writes, layered over a [`StateView`].
pub struct Tx<'a, V: StateView + ?Sized> {
    base: &'a V,
    /// Every widget read so far, in the order first read: its state in `base` and, once
    /// written, its state now (`Some(None)`: deleted). A command touches at most four
    /// widgets, so a linear scan beats a map, and each is read from `base` once.
    seen: Vec<Seen>,
}

struct Seen {
    serial: Serial,
    before: Option<Widget>,
    written: Option<Option<Widget>>,
}

/// One widget a transaction wrote: its post-image, and its state before the command (what
/// a backend needs to know what changed, without reading it again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touched {
    pub change: Change,
    pub before: Option<Widget>,
}

impl<'a, V: StateView + ?Sized> Tx<'a, V> {
    pub fn new(base: &'a V) -> Self {
        Self {
            base,
            seen: Vec::new(),
        }
    }

    pub fn get(&mut self, serial: &Serial) -> Option<Widget> {
        let seen = self.seen(serial);
        match &seen.written {
            Some(now) => now.clone(),
            None => seen.before.clone(),
        }
    }

    fn seen(&mut self, serial: &Serial) -> &mut Seen {
        let at = match self.seen.iter().position(|s| &s.serial == serial) {
            Some(at) => at,
            None => {
                let before = self.base.get(serial);
                self.seen.push(Seen {
                    serial: serial.clone(),
                    before,
                    written: None,
                });
                self.seen.len() - 1
            }
        };
        &mut self.seen[at]
    }

    fn set(&mut self, serial: &Serial, widget: Option<Widget>) {
        self.seen(serial).written = Some(widget);
    }

    /// The post-images of everything this transaction wrote.
    pub fn into_changes(self) -> Vec<Change> {
        self.into_touched().into_iter().map(|t| t.change).collect()
    }

    /// Everything this transaction wrote, each with its state before.
    pub fn into_touched(self) -> Vec<Touched> {
        self.seen
            .into_iter()
            .filter_map(|s| {
                let change = match s.written? {
                    Some(widget) => Change::Put {
                        serial: s.serial,
                        widget,
                    },
                    None => Change::Delete { serial: s.serial },
                };
                Some(Touched {
                    change,
                    before: s.before,
                })
            })
            .collect()
    }

    /// Clears `port` on `serial` if it still points at `expected`.
    fn unplug(&mut self, serial: &Serial, port: PortType, expected: &Serial) {
        if let Some(mut w) = self.get(serial) {
            if w.peer(port) == Some(expected) {
                w.peers[port.index()] = None;
                self.set(serial, Some(w));
            }
        }
    }
}

/// Why a command was refused. Each maps to one API error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("widget '{0}' already exists")]
    WidgetExists(Serial),
    #[error("widget '{0}' does not exist")]
    NotFound(Serial),
    #[error("widget '{serial}' has no port {}", port.as_str())]
    PortNotAvailable { serial: Serial, port: PortType },
    #[error("widget '{0}' cannot be associated with itself")]
    SelfAssociation(Serial),
}

/// One kind of write: the widgets it names, its rules over a transaction, and what it
/// answers with once it is durable. Each kind is its own type, so every backend's
/// `execute` hands a caller exactly the answer its kind has.
pub trait Rule: Send + 'static {
    /// What the write answers with.
    type Output: Send + 'static;

    /// The widgets the write names; the rules may read more (their old peers).
    fn serials(&self) -> Vec<&Serial>;

    /// Runs the rules in `tx`. On error `tx` may hold partial writes: drop it.
    fn run<V: StateView + ?Sized>(&self, tx: &mut Tx<'_, V>) -> Result<Self::Output, DomainError>;
}

/// Create a widget; answers with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Create {
    pub serial: Serial,
    pub name: Name,
    pub ports: Ports,
}

/// Delete a widget, freeing every peer's port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub serial: Serial,
}

/// Plug two widgets together on a port, freeing whatever either was plugged into;
/// answers with both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Associate {
    pub port: PortType,
    pub serial: Serial,
    pub peer: Serial,
}

/// Free a widget's port and its peer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Free {
    pub serial: Serial,
    pub port: PortType,
}

/// Both widgets of an association as they are now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Associated {
    pub widget: WidgetView,
    pub peer: WidgetView,
}

impl Rule for Create {
    type Output = WidgetView;

    fn serials(&self) -> Vec<&Serial> {
        vec![&self.serial]
    }

    fn run<V: StateView + ?Sized>(&self, tx: &mut Tx<'_, V>) -> Result<WidgetView, DomainError> {
        if tx.get(&self.serial).is_some() {
            return Err(DomainError::WidgetExists(self.serial.clone()));
        }
        let widget = Widget::new(self.name.clone(), self.ports);
        let view = widget.view(&self.serial);
        tx.set(&self.serial, Some(widget));
        Ok(view)
    }
}

impl Rule for Delete {
    type Output = ();

    fn serials(&self) -> Vec<&Serial> {
        vec![&self.serial]
    }

    fn run<V: StateView + ?Sized>(&self, tx: &mut Tx<'_, V>) -> Result<(), DomainError> {
        let serial = &self.serial;
        let widget = existing(tx, serial)?;
        for port in widget.ports.iter() {
            if let Some(peer) = widget.peer(port) {
                tx.unplug(peer, port, serial);
            }
        }
        tx.set(serial, None);
        Ok(())
    }
}

impl Rule for Associate {
    type Output = Associated;

    fn serials(&self) -> Vec<&Serial> {
        vec![&self.serial, &self.peer]
    }

    fn run<V: StateView + ?Sized>(&self, tx: &mut Tx<'_, V>) -> Result<Associated, DomainError> {
        let Associate { port, serial, peer } = self;
        let port = *port;
        if serial == peer {
            return Err(DomainError::SelfAssociation(serial.clone()));
        }
        let mut a = existing(tx, serial)?;
        let mut b = existing(tx, peer)?;
        for (s, w) in [(serial, &a), (peer, &b)] {
            if !w.ports.contains(port) {
                return Err(DomainError::PortNotAvailable {
                    serial: s.clone(),
                    port,
                });
            }
        }
        if a.peer(port) != Some(peer) || b.peer(port) != Some(serial) {
            // Re-plug: whoever either side was plugged into loses its end.
            if let Some(old) = a.peer(port).filter(|old| *old != peer) {
                tx.unplug(old, port, serial);
            }
            if let Some(old) = b.peer(port).filter(|old| *old != serial) {
                tx.unplug(old, port, peer);
            }
            a.peers[port.index()] = Some(peer.clone());
            b.peers[port.index()] = Some(serial.clone());
            tx.set(serial, Some(a.clone()));
            tx.set(peer, Some(b.clone()));
        }
        Ok(Associated {
            widget: a.view(serial),
            peer: b.view(peer),
        })
    }
}

impl Rule for Free {
    type Output = ();

    fn serials(&self) -> Vec<&Serial> {
        vec![&self.serial]
    }

    fn run<V: StateView + ?Sized>(&self, tx: &mut Tx<'_, V>) -> Result<(), DomainError> {
        let Free { serial, port } = self;
        let mut widget = existing(tx, serial)?;
        if !widget.ports.contains(*port) {
            return Err(DomainError::PortNotAvailable {
                serial: serial.clone(),
                port: *port,
            });
        }
        if let Some(peer) = widget.peers[port.index()].take() {
            tx.set(serial, Some(widget));
            tx.unplug(&peer, *port, serial);
        }
        Ok(())
    }
}

fn existing<V: StateView + ?Sized>(
    tx: &mut Tx<'_, V>,
    serial: &Serial,
) -> Result<Widget, DomainError> {
    tx.get(serial)
        .ok_or_else(|| DomainError::NotFound(serial.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Map(HashMap<Serial, Widget>);

    impl StateView for Map {
        fn get(&self, serial: &Serial) -> Option<Widget> {
            self.0.get(serial).cloned()
        }
    }

    impl Map {
        fn run<R: Rule>(&mut self, rule: R) -> Result<(R::Output, usize), DomainError> {
            let mut tx = Tx::new(&*self);
            let reply = rule.run(&mut tx)?;
            let changes = tx.into_changes();
            let n = changes.len();
            for change in changes {
                match change {
                    Change::Put { serial, widget } => self.0.insert(serial, widget),
                    Change::Delete { serial } => self.0.remove(&serial),
                };
            }
            Ok((reply, n))
        }

        fn peer(&self, serial: &str, port: PortType) -> Option<&str> {
            self.0[&s(serial)].peer(port).map(|p| p.as_str())
        }
    }

    fn s(x: &str) -> Serial {
        Serial::parse("s", x).unwrap()
    }

    fn create(map: &mut Map, serial: &str, ports: &[PortType]) {
        map.run(Create {
            serial: s(serial),
            name: Name::parse("name", "w").unwrap(),
            ports: Ports::from_list("ports", ports).unwrap(),
        })
        .unwrap();
    }

    fn assoc(port: PortType, a: &str, b: &str) -> Associate {
        Associate {
            port,
            serial: s(a),
            peer: s(b),
        }
    }

    use PortType::*;

    #[test]
    fn replug_frees_both_old_peers() {
        let mut m = Map::default();
        for w in ["a", "b", "c", "d"] {
            create(&mut m, w, &[P, R]);
        }
        m.run(assoc(P, "a", "b")).unwrap();
        m.run(assoc(P, "c", "d")).unwrap();
        let (_, touched) = m.run(assoc(P, "a", "c")).unwrap();
        assert_eq!(touched, 4);
        assert_eq!(m.peer("a", P), Some("c"));
        assert_eq!(m.peer("c", P), Some("a"));
        assert_eq!(m.peer("b", P), None);
        assert_eq!(m.peer("d", P), None);
    }

    #[test]
    fn associate_is_idempotent_and_writes_nothing_the_second_time() {
        let mut m = Map::default();
        create(&mut m, "a", &[P]);
        create(&mut m, "b", &[P]);
        assert_eq!(m.run(assoc(P, "a", "b")).unwrap().1, 2);
        assert_eq!(m.run(assoc(P, "b", "a")).unwrap().1, 0);
        assert_eq!(m.peer("a", P), Some("b"));
    }

    #[test]
    fn associate_errors_change_nothing() {
        let mut m = Map::default();
        create(&mut m, "a", &[P]);
        create(&mut m, "b", &[R]);
        assert_eq!(
            m.run(assoc(P, "a", "a")),
            Err(DomainError::SelfAssociation(s("a")))
        );
        assert_eq!(
            m.run(assoc(P, "a", "zz")),
            Err(DomainError::NotFound(s("zz")))
        );
        assert_eq!(
            m.run(assoc(P, "a", "b")),
            Err(DomainError::PortNotAvailable {
                serial: s("b"),
                port: P
            })
        );
        assert_eq!(m.peer("a", P), None);
    }

    #[test]
    fn delete_frees_every_peer_even_one_plugged_twice() {
        let mut m = Map::default();
        create(&mut m, "a", &[P, R, Q]);
        create(&mut m, "b", &[P, R]);
        create(&mut m, "c", &[Q]);
        m.run(assoc(P, "a", "b")).unwrap();
        m.run(assoc(R, "b", "a")).unwrap();
        m.run(assoc(Q, "a", "c")).unwrap();
        m.run(Delete { serial: s("a") }).unwrap();
        assert!(!m.0.contains_key(&s("a")));
        assert_eq!(m.peer("b", P), None);
        assert_eq!(m.peer("b", R), None);
        assert_eq!(m.peer("c", Q), None);
        assert_eq!(
            m.run(Delete { serial: s("a") }),
            Err(DomainError::NotFound(s("a")))
        );
    }

    #[test]
    fn free_port() {
        let mut m = Map::default();
        create(&mut m, "a", &[P]);
        create(&mut m, "b", &[P]);
        m.run(assoc(P, "a", "b")).unwrap();
        let free = |x: &str, port| Free { serial: s(x), port };
        assert_eq!(m.run(free("b", P)).unwrap().1, 2);
        assert_eq!(m.peer("a", P), None);
        assert_eq!(m.run(free("b", P)).unwrap().1, 0, "freeing a free port");
        assert!(matches!(
            m.run(free("b", Q)),
            Err(DomainError::PortNotAvailable { .. })
        ));
        create(&mut m, "a2", &[P]);
        assert_eq!(
            m.run(Create {
                serial: s("a2"),
                name: Name::parse("name", "x").unwrap(),
                ports: Ports::from_list("ports", &[P]).unwrap()
            }),
            Err(DomainError::WidgetExists(s("a2")))
        );
    }
}
