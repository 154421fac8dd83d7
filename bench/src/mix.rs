//! The operation mix of the load phase: `--mix put=80,free=10,get=10` parsed into weights,
//! and the random requests drawn from it. Serials are drawn uniformly from the widgets the
//! run created (all of which have ports P, R and Q), so every request is valid by
//! construction and any error the server answers is the server's.

use std::fmt;
use std::str::FromStr;
use widgets::domain::PortType;

/// The kinds of request the mix can weigh.
const KEYS: [&str; 3] = ["put", "free", "get"];

/// Relative weights of association PUTs, port frees and widget GETs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    pub put: u32,
    pub free: u32,
    pub get: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            put: 80,
            free: 10,
            get: 10,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MixError {
    #[error("'{0}' is not KEY=WEIGHT (e.g. put=80,free=10,get=10)")]
    Syntax(String),
    #[error("unknown mix key '{0}': expected put, free or get")]
    UnknownKey(String),
    #[error("mix key '{0}' is given twice")]
    Duplicate(String),
    #[error("weight '{1}' of '{0}' is not a whole number")]
    Weight(String, String),
    #[error("the mix weights add up to 0: give at least one a positive weight")]
    Empty,
}

impl FromStr for Mix {
    type Err = MixError;

    /// Keys left out weigh 0, so `--mix put=1` is all PUTs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut weights = [None::<u32>; 3];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| MixError::Syntax(part.to_owned()))?;
            let key = key.trim().to_ascii_lowercase();
            let slot = KEYS
                .iter()
                .position(|k| *k == key)
                .ok_or_else(|| MixError::UnknownKey(key.clone()))?;
            let weight = value
                .trim()
                .parse()
                .map_err(|_| MixError::Weight(key.clone(), value.trim().to_owned()))?;
            if weights[slot].replace(weight).is_some() {
                return Err(MixError::Duplicate(key));
            }
        }
        let [put, free, get] = weights.map(|w| w.unwrap_or(0));
        if u64::from(put) + u64::from(free) + u64::from(get) == 0 {
            return Err(MixError::Empty);
        }
        Ok(Mix { put, free, get })
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "put={},free={},get={}", self.put, self.free, self.get)
    }
}

/// One request of the mix, with the serials it names (indices into the created set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Put {
        port: PortType,
        widget: usize,
        peer: usize,
    },
    Free {
        widget: usize,
        port: PortType,
    },
    Get {
        widget: usize,
    },
}

impl Mix {
    /// Draws a request over `widgets` created widgets (at least 2, so a PUT has two
    /// distinct sides).
    pub fn draw(&self, rng: &mut fastrand::Rng, widgets: usize) -> Request {
        debug_assert!(widgets >= 2);
        let total = u64::from(self.put) + u64::from(self.free) + u64::from(self.get);
        let roll = rng.u64(..total);
        if roll < u64::from(self.put) {
            let (widget, peer) = distinct_pair(rng, widgets);
            Request::Put {
                port: random_port(rng),
                widget,
                peer,
            }
        } else if roll < u64::from(self.put) + u64::from(self.free) {
            Request::Free {
                widget: rng.usize(..widgets),
                port: random_port(rng),
            }
        } else {
            Request::Get {
                widget: rng.usize(..widgets),
            }
        }
    }
}

/// Two different indices below `n`, each uniform.
pub fn distinct_pair(rng: &mut fastrand::Rng, n: usize) -> (usize, usize) {
    let a = rng.usize(..n);
    // Drawing from n - 1 and skipping `a` keeps the peer uniform over the others.
    let b = rng.usize(..n - 1);
    (a, if b >= a { b + 1 } else { b })
}

pub fn random_port(rng: &mut fastrand::Rng) -> PortType {
    PortType::ALL[rng.usize(..PortType::ALL.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_weights_and_defaults_missing_keys_to_zero() {
        assert_eq!(
            "put=80,free=10,get=10".parse(),
            Ok(Mix {
                put: 80,
                free: 10,
                get: 10
            })
        );
        assert_eq!(
            " GET = 3 , put=1 ".parse(),
            Ok(Mix {
                put: 1,
                free: 0,
                get: 3
            })
        );
        assert_eq!(Mix::default().to_string().parse(), Ok(Mix::default()));
    }

    #[test]
    fn rejects_bad_mixes() {
        assert_eq!(
            "put=1,delete=2".parse::<Mix>(),
            Err(MixError::UnknownKey("delete".into()))
        );
        assert_eq!("put".parse::<Mix>(), Err(MixError::Syntax("put".into())));
        assert_eq!(
            "put=1,put=2".parse::<Mix>(),
            Err(MixError::Duplicate("put".into()))
        );
        assert_eq!(
            "put=-1".parse::<Mix>(),
            Err(MixError::Weight("put".into(), "-1".into()))
        );
        assert_eq!("put=0,get=0".parse::<Mix>(), Err(MixError::Empty));
        assert_eq!("".parse::<Mix>(), Err(MixError::Empty));
        assert!(MixError::UnknownKey("delete".into())
            .to_string()
            .contains("expected put, free or get"));
    }

    #[test]
    fn draws_follow_the_weights() {
        let mut rng = fastrand::Rng::with_seed(7);
        let only_gets = Mix {
            put: 0,
            free: 0,
            get: 1,
        };
        assert!((0..1000).all(|_| matches!(only_gets.draw(&mut rng, 2), Request::Get { .. })));
        let mix = Mix::default();
        let puts = (0..10_000)
            .filter(|_| matches!(mix.draw(&mut rng, 5), Request::Put { .. }))
            .count();
        assert!((7_500..8_500).contains(&puts), "{puts} PUTs of 10000");
    }

    #[test]
    fn a_put_never_names_one_widget_twice() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut seen = [false; 3];
        for _ in 0..1000 {
            let (a, b) = distinct_pair(&mut rng, 3);
            assert!(a != b && a < 3 && b < 3);
            seen[b] = true;
        }
        assert_eq!(seen, [true; 3], "every peer can be drawn");
    }
}
