//! Lenient decoding: one object that does not decode costs that object, never
//! a watch.
//!
//! A LIST is one `ObjectList<K>`: with strict decoding, one item the types
//! cannot hold (an integer past `i32`, an enum value of a newer release, a
//! missing field of an older one) fails the whole page, and kube's watcher
//! retries that list for ever — the controller then reconciles nothing for any
//! tenant, the agent pulls nothing. The API server does not stop every such
//! value (before Kubernetes 1.36 `format: int32` is not enforced, and objects
//! stored under an older CRD keep what they had), so the product must not
//! depend on it.
//!
//! Each spec and status therefore decodes on its own: when it does not, it
//! becomes its type's *unreadable* placeholder, which carries the field path
//! and serde's message. Whoever reads the object sees that and acts on it (the
//! controller skips an unreadable ImagePrefetch and says why on it; a node's
//! unreadable report counts as no report; the agent leaves an unreadable set's
//! images as they were), and every other object is read as usual.

use std::fmt;

/// The largest `int64` a schema may name as a bound: 2^53 − 1. The API
/// server reads a schema's `maximum` as a float64, and `i64::MAX` (2^63 − 1)
/// rounds up to 2^63, which it turns into `i64::MIN`: every value is then
/// refused as "less than or equal to -9223372036854775808" (seen on
/// kube-apiserver 1.35). No count, generation or size comes near 2^53.
pub const MAX_SCHEMA_INT64: i64 = (1 << 53) - 1;

/// Why a spec or status did not decode: the field and serde's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    /// The path of the offending field from the object's root, e.g.
    /// `spec.replicas` or `status.images[0].attempts`.
    pub field: String,
    /// What is wrong with it, as serde says it.
    pub error: String,
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.error)
    }
}

/// A spec or status that decodes on its own (see the module's doc).
pub trait Lenient: Sized {
    /// The field of the object this type is (`spec`, `status`).
    const FIELD: &'static str;
    /// The placeholder that stands for an unreadable value.
    fn unreadable(why: Unreadable) -> Self;
    /// Why this value is a placeholder; `None` when it decoded.
    fn why_unreadable(&self) -> Option<&Unreadable>;
}

/// Decodes `value` strictly with `strict` (the type's derived decoder), or
/// gives the type's unreadable placeholder naming the field that failed.
pub fn decode<T: Lenient>(
    value: &serde_json::Value,
    strict: impl FnOnce(
        serde_path_to_error::Deserializer<&serde_json::Value>,
    ) -> Result<T, serde_json::Error>,
) -> T {
    let mut track = serde_path_to_error::Track::new();
    match strict(serde_path_to_error::Deserializer::new(value, &mut track)) {
        Ok(decoded) => decoded,
        Err(error) => {
            let path = track.path().to_string();
            let field = if path == "." {
                T::FIELD.to_string()
            } else {
                format!("{}.{path}", T::FIELD)
            };
            T::unreadable(Unreadable {
                field,
                error: error.to_string(),
            })
        }
    }
}

/// `Deserialize` and `Serialize` for a type whose derives are declared with
/// `#[serde(remote = "Self")]` (serde then generates inherent functions, which
/// these trait impls wrap), decoding through [`decode`]; and [`Lenient`],
/// given the object's field the type is and the placeholder for an
/// unreadable value, kept in the type's `unreadable` field.
#[macro_export]
macro_rules! decode_leniently {
    ($type:ty, $field:literal, $placeholder:expr) => {
        impl $crate::lenient::Lenient for $type {
            const FIELD: &'static str = $field;
            fn unreadable(why: $crate::lenient::Unreadable) -> Self {
                let placeholder: fn($crate::lenient::Unreadable) -> Self = $placeholder;
                placeholder(why)
            }
            fn why_unreadable(&self) -> Option<&$crate::lenient::Unreadable> {
                self.unreadable.as_ref().map(::std::borrow::Borrow::borrow)
            }
        }
        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // Any JSON at all is accepted here; what it means is decided below.
                let value = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
                Ok($crate::lenient::decode(&value, |d| <$type>::deserialize(d)))
            }
        }
        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                <$type>::serialize(self, s)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::{ImagePrefetch, NodeImageSet};

    fn prefetch(spec: Value) -> ImagePrefetch {
        serde_json::from_value(json!({
            "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": spec,
        }))
        .expect("an object with readable metadata always decodes")
    }

    fn set(spec: Value, status: Value) -> NodeImageSet {
        serde_json::from_value(json!({
            "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
            "metadata": {"name": "s"},
            "spec": spec, "status": status,
        }))
        .expect("an object with readable metadata always decodes")
    }

    fn good_set_spec() -> Value {
        json!({"nodeName": "n1", "imageSet": [{"name": "r.example/a:1", "registryPolicy": "Default"}]})
    }

    fn report(image: Value) -> Value {
        json!({"available": 0, "total": 1, "images": [image]})
    }

    /// What a hostile or careless writer can put into a spec, and the field
    /// each unreadable spec names.
    #[test]
    fn a_spec_that_does_not_decode_names_its_field() {
        let cases = [
            (
                json!({"images": ["a:1"], "replicas": 2147483648u64}),
                "spec.replicas",
            ),
            (
                json!({"images": ["a:1"], "replicas": "three"}),
                "spec.replicas",
            ),
            (
                json!({"images": ["a:1"], "replicas": -1e300}),
                "spec.replicas",
            ),
            (json!({"images": [7]}), "spec.images[0]"),
            (json!({"replicas": 1}), "spec"),
            (
                json!({"images": ["a:1"], "fromANewerVersion": []}),
                "spec.fromANewerVersion",
            ),
            (
                json!({"images": ["a:1"], "imagePullSecrets": [{"name": null}]}),
                "spec.imagePullSecrets[0].name",
            ),
            (json!("not an object"), "spec"),
        ];
        for (spec, field) in cases {
            let p = prefetch(spec.clone());
            let why = p
                .spec
                .unreadable
                .unwrap_or_else(|| panic!("{spec} decoded"));
            assert_eq!(why.field, field, "{spec}: {}", why.error);
            assert!(p.spec.images.is_empty());
        }
        let fine = prefetch(json!({"images": ["a:1"], "replicas": 3}));
        assert_eq!((fine.spec.unreadable, fine.spec.replicas), (None, Some(3)));
    }

    #[test]
    fn a_node_report_that_does_not_decode_costs_only_the_report() {
        let cases = [
            (
                report(
                    json!({"name": "r.example/a:1", "state": "Available", "attempts": 2147483648u64}),
                ),
                "status.images[0].attempts",
            ),
            (
                report(json!({"name": "r.example/a:1", "state": "Evicted"})),
                "status.images[0].state",
            ),
            (report(json!({"name": "r.example/a:1"})), "status.images[0]"),
            (
                report(json!({"name": "r.example/a:1", "state": "Available", "sizeBytes": 1e30})),
                "status.images[0].sizeBytes",
            ),
            (json!({"available": 4294967296u64}), "status.available"),
            (
                json!({"conditions": [{"type": "Ready"}]}),
                "status.conditions[0]",
            ),
        ];
        for (status, field) in cases {
            let s = set(good_set_spec(), status.clone());
            let st = s.status.expect("an unreadable status is still a status");
            let why = st.unreadable.unwrap_or_else(|| panic!("{status} decoded"));
            assert_eq!(why.field, field, "{status}: {}", why.error);
            assert!(st.images.is_empty(), "no report is taken from it");
            assert_eq!(s.spec.unreadable, None, "the spec is still read");
            assert_eq!(s.spec.image_set.len(), 1);
        }
    }

    #[test]
    fn a_set_spec_of_a_newer_release_is_unreadable_not_misread() {
        let s = set(
            json!({"nodeName": "n1", "imageSet": [{"name": "r.example/a:1", "registryPolicy": "Preferred"}]}),
            report(json!({"name": "r.example/a:1", "state": "Available"})),
        );
        let why = s.spec.unreadable.expect("unknown policy");
        assert_eq!(why.field, "spec.imageSet[0].registryPolicy");
        assert!(s.spec.image_set.is_empty());
        assert_eq!(
            s.status.unwrap().images.len(),
            1,
            "the report is still read"
        );
    }

    /// A list is decoded item by item: one bad item costs only itself.
    #[test]
    fn one_bad_item_does_not_fail_a_list() {
        let list: kube::core::ObjectList<ImagePrefetch> = serde_json::from_value(json!({
            "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetchList",
            "metadata": {"resourceVersion": "1"},
            "items": [
                {"metadata": {"name": "bad", "namespace": "a"}, "spec": {"images": ["a:1"], "replicas": 2147483648u64}},
                {"metadata": {"name": "good", "namespace": "b"}, "spec": {"images": ["b:1"]}},
            ],
        }))
        .unwrap();
        assert!(list.items[0].spec.unreadable.is_some());
        assert_eq!(list.items[1].spec.images, ["b:1"]);
        assert_eq!(list.items[1].spec.unreadable, None);
    }

    /// What decodes writes back as it was read; the marker is never written.
    #[test]
    fn readable_objects_round_trip() {
        let spec = json!({"images": ["a:1"], "nodeSelector": {"k": "v"}, "replicas": 2, "imagePullSecrets": [{"name": "s"}]});
        assert_eq!(
            serde_json::to_value(&prefetch(spec.clone()).spec).unwrap(),
            spec
        );
        let status = report(json!({"name": "r.example/a:1", "state": "Pulling", "attempts": 1}));
        let s = set(good_set_spec(), status.clone());
        assert_eq!(serde_json::to_value(s.status.unwrap()).unwrap(), status);
    }
}
