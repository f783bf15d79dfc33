//! Property tests of graph edge conditions (`mageflow_core::condition`): evaluation is total
//! and its logic is the logic of its parts.

use mageflow_core::condition::{lookup, Predicate};
use proptest::prelude::*;
use serde_json::{json, Value};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-1000i64..1000).prop_map(Value::from),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-z]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-c]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            "[a-c]".prop_map(|k| format!(".{k}")),
            (0usize..3).prop_map(|i| format!("[{i}]"))
        ],
        0..3,
    )
    .prop_map(|segs| format!("${}", segs.concat()))
}

fn arb_predicate() -> impl Strategy<Value = Predicate> {
    let leaf = prop_oneof![
        (arb_path(), arb_json()).prop_map(|(path, value)| Predicate::Eq { path, value }),
        (arb_path(), arb_json()).prop_map(|(path, value)| Predicate::Ne { path, value }),
        (arb_path(), prop::collection::vec(arb_json(), 0..3))
            .prop_map(|(path, values)| Predicate::In { path, values }),
        arb_path().prop_map(|path| Predicate::Exists { path }),
        (arb_path(), -100f64..100.0).prop_map(|(path, value)| Predicate::Gt { path, value }),
        (arb_path(), -100f64..100.0).prop_map(|(path, value)| Predicate::Le { path, value }),
        (arb_path(), "[a-z.^$*]{0,5}")
            .prop_map(|(path, pattern)| Predicate::Regex { path, pattern }),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(|of| Predicate::All { of }),
            prop::collection::vec(inner.clone(), 0..3).prop_map(|of| Predicate::Any { of }),
            inner.prop_map(|p| Predicate::Not { of: Box::new(p) }),
        ]
    })
}

proptest! {
    /// Any predicate on any output evaluates (no panic), the same twice, and through its JSON
    /// form the same; `not` inverts, `all`/`any` are the conjunction/disjunction of their parts,
    /// and what a test saw is what its path finds.
    #[test]
    fn evaluation_is_total_and_compositional(p in arb_predicate(), out in arb_json()) {
        let (ok, saw) = p.eval(&out);
        prop_assert_eq!(p.eval(&out), (ok, saw.clone()));
        let text = serde_json::to_string(&p).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: Predicate = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back.holds(&out), ok);
        prop_assert_eq!(Predicate::Not { of: Box::new(p.clone()) }.holds(&out), !ok);
        match &p {
            Predicate::All { of } => prop_assert_eq!(ok, of.iter().all(|q| q.holds(&out))),
            Predicate::Any { of } => prop_assert_eq!(ok, of.iter().any(|q| q.holds(&out))),
            Predicate::Eq { path, value } => {
                prop_assert_eq!(ok, lookup(&out, path) == Some(value));
                prop_assert_eq!(&saw, lookup(&out, path).unwrap_or(&Value::Null));
            }
            Predicate::Exists { path } => prop_assert_eq!(ok, lookup(&out, path).is_some()),
            _ => {}
        }
    }

    /// A value put at a path is found there by `eq`.
    #[test]
    fn eq_finds_what_is_at_its_path(key in "[a-c]", value in arb_json(), rest in arb_json()) {
        let out = json!({ "wrap": [ { key.clone(): value.clone() }, rest ] });
        let p = Predicate::Eq { path: format!("$.wrap[0].{key}"), value };
        prop_assert!(p.holds(&out));
        prop_assert!(p.validate().is_ok());
    }
}
