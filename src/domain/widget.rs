//! The widget record as the hot state holds it, the one validator every widget read from
//! outside the rules passes, and the JSON view the API returns.

use super::values::{Name, PortType, Ports, Serial, ValidationError};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// A widget's state, without its serial (the serial is the map key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Widget {
    pub name: Name,
    pub ports: Ports,
    /// The peer on each port, indexed by [`PortType::index`]; always `None` for a port the
    /// widget does not have.
    pub peers: [Option<Serial>; 3],
    /// The LSN of the last change that touched this widget: it only grows, so a durable
    /// store can refuse to write older state over newer.
    pub version: u64,
}

impl Widget {
    pub fn new(name: Name, ports: Ports) -> Self {
        Self {
            name,
            ports,
            peers: [None, None, None],
            version: 0,
        }
    }

    /// The one check for a widget that was decoded rather than made by the rules (from
    /// the WAL, the embedded store or PostgreSQL): its serial, name and ports as the API
    /// would have accepted them, and a peer only on a port the widget has, never itself.
    /// Every load runs it, so damage anywhere is a clean error naming the serial, never a
    /// panic further on.
    pub fn check(&self, serial: &Serial) -> Result<(), ValidationError> {
        Serial::check("serial", serial.as_str())?;
        Name::check("name", self.name.as_str())?;
        let ports = Ports::from_bits(self.ports.bits())
            .ok_or_else(|| ValidationError::new("ports", "must be a non-empty set of P, R, Q"))?;
        for port in PortType::ALL {
            match self.peer(port) {
                Some(peer) if !ports.contains(port) => {
                    return Err(ValidationError::new(
                        "peers",
                        format!(
                            "a peer ({peer}) on port {}, which the widget lacks",
                            port.as_str()
                        ),
                    ))
                }
                Some(peer) if peer == serial => {
                    return Err(ValidationError::new(
                        "peers",
                        format!("associated with itself on port {}", port.as_str()),
                    ))
                }
                Some(peer) => Serial::check("peer", peer.as_str())?,
                None => {}
            }
        }
        Ok(())
    }

    pub fn peer(&self, port: PortType) -> Option<&Serial> {
        self.peers[port.index()].as_ref()
    }

    pub fn view(&self, serial: &Serial) -> WidgetView {
        WidgetView {
            serial_number: serial.clone(),
            name: self.name.clone(),
            ports: PortList(self.ports),
            associations: Associations {
                ports: self.ports,
                peers: self.peers.clone(),
            },
        }
    }
}

/// A widget as the API returns it: ports in canonical order, one `associations` key per
/// port the widget has, `null` where that port is free.
///
/// It holds the widget's own values (a serial or a name of up to 24 bytes is held inline)
/// rather than strings and lists of its own: the sequencer builds two for every
/// association's answer, and a worker serializes and frees them, so each allocation here
/// was made on one thread and freed on another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "serial_number": "123", "name": "widget1", "ports": ["P", "R"],
    "associations": {"P": "321", "R": null}
}))]
pub struct WidgetView {
    #[schema(schema_with = super::schema::serial)]
    pub serial_number: Serial,
    #[schema(schema_with = super::schema::name)]
    pub name: Name,
    #[schema(schema_with = super::schema::ports)]
    pub ports: PortList,
    #[schema(schema_with = super::schema::associations)]
    pub associations: Associations,
}

/// A widget's ports, serialized as a JSON list in canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortList(pub Ports);

impl Serialize for PortList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
}

/// A widget's ports and their peers, serialized as a JSON object in canonical port order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Associations {
    pub ports: Ports,
    /// The peer on each port, by [`PortType::index`]; only the ports in `ports` are shown.
    pub peers: [Option<Serial>; 3],
}

impl Serialize for Associations {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.ports.iter().count()))?;
        for port in self.ports.iter() {
            map.serialize_entry(port.as_str(), &self.peers[port.index()])?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_is_canonical() {
        let mut w = Widget::new(
            Name::parse("name", "widget1").unwrap(),
            Ports::from_list("ports", &[PortType::Q, PortType::P, PortType::R]).unwrap(),
        );
        w.peers[PortType::R.index()] = Some(Serial::parse("s", "321").unwrap());
        let json = serde_json::to_string(&w.view(&Serial::parse("s", "123").unwrap())).unwrap();
        assert_eq!(
            json,
            r#"{"serial_number":"123","name":"widget1","ports":["P","R","Q"],"associations":{"P":null,"R":"321","Q":null}}"#
        );
    }
}
