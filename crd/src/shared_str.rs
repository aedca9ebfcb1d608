//! [`SharedStr`]: an immutable string whose copies share one allocation.
//!
//! Image names, digests and node names repeat across every NodeImageSet of a
//! rollout — one image on 5,000 nodes is 5,000 copies of its name and its
//! digest in the controller's cache, in the spec and again in the agent's
//! report. As `String`s each copy was its own allocation; as `SharedStr`s a
//! cache can hold each distinct value once ([`SharedStr::intern`]) and a
//! clone costs a reference count. On the wire it is a plain string.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(
    Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct SharedStr(Arc<str>);

impl SharedStr {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// This value as held in `pool`, added when it is not there yet: equal
    /// strings passed through one pool share one allocation.
    pub fn intern(&mut self, pool: &mut HashSet<SharedStr>) {
        match pool.get(self.as_str()) {
            Some(held) => *self = held.clone(),
            None => {
                pool.insert(self.clone());
            }
        }
    }

    /// Whether this is the only copy left (a pool's own, once every user
    /// dropped theirs): what a pool sheds.
    pub fn is_unique(&self) -> bool {
        Arc::strong_count(&self.0) == 1
    }
}

impl Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

// Hash and Eq agree with `str`'s, so sets and maps keyed by SharedStr can be
// looked up by `&str`.
impl Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        SharedStr(Arc::from(s))
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        SharedStr(Arc::from(s))
    }
}

impl From<&String> for SharedStr {
    fn from(s: &String) -> Self {
        SharedStr(Arc::from(s.as_str()))
    }
}

impl From<&SharedStr> for SharedStr {
    fn from(s: &SharedStr) -> Self {
        s.clone()
    }
}

impl From<SharedStr> for String {
    fn from(s: SharedStr) -> Self {
        s.0.to_string()
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for SharedStr {
    fn eq(&self, other: &String) -> bool {
        &*self.0 == other.as_str()
    }
}

impl PartialEq<SharedStr> for str {
    fn eq(&self, other: &SharedStr) -> bool {
        self == &*other.0
    }
}

impl PartialEq<SharedStr> for &str {
    fn eq(&self, other: &SharedStr) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<SharedStr> for String {
    fn eq(&self, other: &SharedStr) -> bool {
        self.as_str() == &*other.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_copies_share_one_allocation_and_the_pool_sheds_what_nobody_holds() {
        let mut pool = HashSet::new();
        let mut a = SharedStr::from("registry.example.com/app:1".to_string());
        let mut b = SharedStr::from("registry.example.com/app:1");
        a.intern(&mut pool);
        b.intern(&mut pool);
        assert!(std::ptr::eq(a.as_str(), b.as_str()));
        assert_eq!(pool.len(), 1);
        drop((a, b));
        pool.retain(|s| !s.is_unique());
        assert!(pool.is_empty());
    }

    #[test]
    fn it_is_a_plain_string_on_the_wire_and_compares_with_strings() {
        let s: SharedStr = serde_json::from_str("\"sha256:ab\"").unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"sha256:ab\"");
        let text = String::from("sha256:ab");
        assert_eq!(s, "sha256:ab");
        assert_eq!("sha256:ab", s);
        assert_eq!(s, text);
        assert_eq!(text, s);
    }
}
