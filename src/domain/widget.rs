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
            serial_number: serial.to_string(),
            name: self.name.as_str().to_owned(),
            ports: self.ports.iter().collect(),
            associations: Associations(
                self.ports
                    .iter()
                    .map(|p| (p, self.peer(p).map(|s| s.to_string())))
                    .collect(),
            ),
        }
    }
}

/// A widget as the API returns it: ports in canonical order, one `associations` key per
/// port the widget has, `null` where that port is free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "serial_number": "123", "name": "widget1", "ports": ["P", "R"],
    "associations": {"P": "321", "R": null}
}))]
pub struct WidgetView {
    #[schema(schema_with = super::schema::serial)]
    pub serial_number: String,
    #[schema(schema_with = super::schema::name)]
    pub name: String,
    #[schema(schema_with = super::schema::ports)]
    pub ports: Vec<PortType>,
    #[schema(schema_with = super::schema::associations)]
    pub associations: Associations,
}

/// A widget's ports and their peers, serialized as a JSON object in canonical port order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Associations(pub Vec<(PortType, Option<String>)>);

impl Serialize for Associations {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (port, peer) in &self.0 {
            map.serialize_entry(port.as_str(), peer)?;
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
