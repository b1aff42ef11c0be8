//! Finding a node of `milter.yaml` again by its path ([`locate`]): checks
//! that need the whole file run after serde_yaml has deserialized it, and
//! walk the YAML to the offending node to report its line and column
//! (src/config/read.rs).

use crate::address::normalize_domain;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// One step of a path into the YAML document.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Seg {
    /// The value under a mapping key (compared as a domain/address would be).
    Key(String),
    /// The mapping key itself.
    KeyItself(String),
    /// The n-th (from 0) occurrence of a mapping key itself, for keys given
    /// more than once.
    Again(String, usize),
    Index(usize),
}

impl fmt::Display for Seg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seg::Key(k) | Seg::KeyItself(k) | Seg::Again(k, _) => f.write_str(k),
            Seg::Index(i) => write!(f, "{i}"),
        }
    }
}

pub(super) const FOUND: &str = "\u{0}dualroute-locate-found";

/// Finds the line and column (1-based) of the node at `path`.
pub fn locate(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    let de = serde_yaml::Deserializer::from_str(text);
    match Locate(path).deserialize(de) {
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

fn loose(s: &str) -> String {
    let s = s.trim();
    match s.rsplit_once('@') {
        Some((l, d)) => format!(
            "{}@{}",
            l.to_lowercase(),
            normalize_domain(d).unwrap_or_else(|_| d.to_lowercase())
        ),
        None => normalize_domain(s).unwrap_or_else(|_| s.to_lowercase()),
    }
}

pub(super) struct Locate<'p>(pub(super) &'p [Seg]);

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        let Some((head, rest)) = self.0.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let mut seen = 0;
        while let Some(k) = m.next_key_seed(KeySeed(head, seen))? {
            if k && matches!(head, Seg::Key(_)) {
                return m.next_value_seed(Locate(rest));
            }
            seen += usize::from(k);
            m.next_value::<IgnoredAny>()?;
        }
        Err(de::Error::custom("not found"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        let Some((head, rest)) = self.0.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let mut i = 0;
        loop {
            if matches!(head, Seg::Index(n) if *n == i) {
                return s.next_element_seed(Locate(rest)).map(|_| ());
            }
            if s.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom("not found"));
            }
            i += 1;
        }
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.leaf()
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
}

impl Locate<'_> {
    fn leaf<E: de::Error>(&self) -> Result<(), E> {
        Err(de::Error::custom(if self.0.is_empty() {
            FOUND
        } else {
            "not found"
        }))
    }
}

/// Reads a mapping key; yields whether it is the wanted one, and fails
/// (so that the key's own mark is reported) when the key itself is sought
/// and this is its wanted occurrence (the second field: matches so far).
struct KeySeed<'p>(&'p Seg, usize);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        match self.0 {
            Seg::Key(k) => Ok(loose(k) == loose(v)),
            Seg::KeyItself(k) if loose(k) == loose(v) => Err(E::custom(FOUND)),
            Seg::Again(k, n) if loose(k) == loose(v) && *n == self.1 => Err(E::custom(FOUND)),
            Seg::Again(k, _) => Ok(loose(k) == loose(v)),
            _ => Ok(false),
        }
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}
