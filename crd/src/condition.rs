//! Standard conditions whose `lastTransitionTime` moves only when their
//! status does, so that rewriting an unchanged status is a no-op and a
//! controller cannot trigger itself by writing one.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::{Schema, SchemaGenerator, json_schema};

use crate::vocabulary::{ConditionReason, ConditionType, Word};

/// Most conditions a status carries.
pub const MAX_CONDITIONS: usize = 8;

/// The schema of a `conditions` list, with the bounds Kubernetes' own
/// `metav1.Condition` declares (k8s-openapi's generated schema has none of
/// them): a status is written by another process, and an unbounded field
/// is one a careless writer can fill.
pub fn schema(_: &mut SchemaGenerator) -> Schema {
    fn listed<W: Word>() -> String {
        W::iter().map(Word::as_str).collect::<Vec<_>>().join(", ")
    }
    json_schema!({
        "type": "array",
        "maxItems": MAX_CONDITIONS,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": {"type": "string", "minLength": 1, "maxLength": 316,
                         "description": format!("One of: {}.", listed::<ConditionType>())},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0, "maximum": crate::lenient::MAX_SCHEMA_INT64},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "reason": {"type": "string", "minLength": 1, "maxLength": 1024,
                           "description": format!("One of: {}.", listed::<ConditionReason>())},
                "message": {"type": "string", "maxLength": 32768},
            },
        },
    })
}

/// The condition `type_`, keeping the transition time of `old`'s condition of
/// that type when its status is unchanged, else stamping `now`.
pub fn condition(
    old: &[Condition],
    type_: ConditionType,
    status: bool,
    reason: ConditionReason,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let type_ = type_.as_str();
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.as_str().to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Now, to the second: the API stores seconds, and a finer time would never
/// compare equal to the stored one.
pub fn now() -> Time {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    Time(k8s_openapi::jiff::Timestamp::from_second(now).expect("now is a valid timestamp"))
}

/// The condition of type `type_` in `conditions`, if there is one.
pub fn find(conditions: &[Condition], type_: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}
