//! Not a section of `milter.yaml`: how every section is read from YAML.
//! Values are parsed inside serde's own deserialization so that serde_yaml
//! marks an error with the position of the scalar or mapping that is wrong
//! (docs/design.md §5).

use serde::{de, Deserialize, Deserializer};
use std::fmt;

/// Implements `Deserialize` through `FromStr`. The parse runs inside the
/// visitor, so serde_yaml marks the error with the scalar's own position.
macro_rules! deserialize_from_str {
    ($t:ty, $what:expr) => {
        impl<'de> ::serde::Deserialize<'de> for $t {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> ::serde::de::Visitor<'de> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut ::std::fmt::Formatter) -> ::std::fmt::Result {
                        write!(f, "a {}", $what)
                    }
                    fn visit_str<E: ::serde::de::Error>(self, s: &str) -> Result<$t, E> {
                        s.parse().map_err(|e| E::custom(format!("{}: {e}", $what)))
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}
pub(super) use deserialize_from_str;

/// Deserializes a mapping as `R`, then checks it with `check`, inside the
/// mapping's own deserialization so that errors point at the mapping.
pub(super) fn checked_map<'de, D, R, T>(
    d: D,
    check: impl FnOnce(R) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    R: Deserialize<'de>,
{
    struct V<R, F>(F, std::marker::PhantomData<R>);
    impl<'de, R: Deserialize<'de>, T, F: FnOnce(R) -> Result<T, String>> de::Visitor<'de> for V<R, F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a mapping")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let raw = R::deserialize(de::value::MapAccessDeserializer::new(map))?;
            (self.0)(raw).map_err(de::Error::custom)
        }
    }
    d.deserialize_map(V(check, std::marker::PhantomData))
}

/// A YAML mapping as its entries in order, duplicates included.
pub(super) fn entries<'de, D, K, V>(d: D, what: &'static str) -> Result<Vec<(K, V)>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de>,
    V: Deserialize<'de>,
{
    struct Entries<K, V>(&'static str, std::marker::PhantomData<(K, V)>);
    impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> de::Visitor<'de> for Entries<K, V> {
        type Value = Vec<(K, V)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(k) = m.next_key::<K>()? {
                out.push((k, m.next_value::<V>()?));
            }
            Ok(out)
        }
    }
    d.deserialize_map(Entries(what, std::marker::PhantomData))
}
