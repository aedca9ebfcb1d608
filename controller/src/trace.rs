//! One trace per rollout. A rollout (one generation of an ImagePrefetch,
//! until its images are on every selected node) takes many reconciles: the
//! seeds are written first, the mirror pulls in later waves, each agent report
//! triggers another look. The first reconcile of a rollout starts a trace and
//! every later one joins it as a child, so one trace shows the whole story
//! from the first decision to the last node's pull. Once the rollout is done,
//! reconciles (resyncs, a node joining later) get traces of their own.
//!
//! Kept in memory: after a controller restart a rollout still under way
//! continues in a new trace.

use std::collections::HashMap;
use std::sync::Mutex;

use opentelemetry::trace::SpanContext;

#[derive(Default)]
pub struct Rollouts {
    by_uid: Mutex<HashMap<String, Rollout>>,
}

struct Rollout {
    generation: i64,
    /// The first reconcile's span; `None` once the rollout is done.
    root: Option<SpanContext>,
}

impl Rollouts {
    /// The parent of a reconcile of generation `generation` of `uid`: the
    /// rollout's first reconcile, or `None` when this reconcile stands alone
    /// (the rollout is done) or starts the rollout (then call [`Self::begin`]).
    pub fn parent(&self, uid: &str, generation: i64) -> Option<SpanContext> {
        let map = self.by_uid.lock().expect("rollouts lock");
        map.get(uid)
            .filter(|r| r.generation == generation)
            .and_then(|r| r.root.clone())
    }

    /// Records `root` as the start of the rollout of `generation`, unless that
    /// rollout already has a start or is done.
    pub fn begin(&self, uid: &str, generation: i64, root: SpanContext) {
        let mut map = self.by_uid.lock().expect("rollouts lock");
        match map.get(uid) {
            Some(r) if r.generation >= generation => {}
            _ => {
                map.insert(
                    uid.to_string(),
                    Rollout {
                        generation,
                        root: Some(root),
                    },
                );
            }
        }
    }

    /// The rollout of `generation` reached every node: later reconciles of the
    /// same generation start traces of their own.
    pub fn finish(&self, uid: &str, generation: i64) {
        let mut map = self.by_uid.lock().expect("rollouts lock");
        map.insert(
            uid.to_string(),
            Rollout {
                generation,
                root: None,
            },
        );
    }

    /// The ImagePrefetch is gone.
    pub fn forget(&self, uid: &str) {
        self.by_uid.lock().expect("rollouts lock").remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    fn span(n: u8) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes([n; 16]),
            SpanId::from_bytes([n; 8]),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }

    #[test]
    fn later_reconciles_of_a_rollout_join_its_first_trace() {
        let r = Rollouts::default();
        assert_eq!(r.parent("uid", 1), None, "the first reconcile starts it");
        r.begin("uid", 1, span(1));
        assert_eq!(r.parent("uid", 1), Some(span(1)));
        r.begin("uid", 1, span(2));
        assert_eq!(r.parent("uid", 1), Some(span(1)), "the start stays");
        assert_eq!(r.parent("other", 1), None);
    }

    #[test]
    fn a_finished_rollout_lets_reconciles_stand_alone() {
        let r = Rollouts::default();
        r.begin("uid", 1, span(1));
        r.finish("uid", 1);
        assert_eq!(r.parent("uid", 1), None);
        r.begin("uid", 1, span(2));
        assert_eq!(r.parent("uid", 1), None, "a done rollout does not restart");
    }

    #[test]
    fn a_new_generation_starts_a_new_rollout() {
        let r = Rollouts::default();
        r.begin("uid", 1, span(1));
        r.finish("uid", 1);
        assert_eq!(r.parent("uid", 2), None);
        r.begin("uid", 2, span(2));
        assert_eq!(r.parent("uid", 2), Some(span(2)));
        assert_eq!(r.parent("uid", 1), None, "an old generation is not joined");
        r.begin("uid", 1, span(3));
        assert_eq!(
            r.parent("uid", 2),
            Some(span(2)),
            "a stale event changes nothing"
        );
        r.forget("uid");
        assert_eq!(r.parent("uid", 2), None);
    }
}
