//! Conditions on a node's outcome and output: what a conditional graph's edges route on.
//!
//! An edge is taken on the source node's outcome — [`Condition::OnSuccess`],
//! [`Condition::OnFailure`], [`Condition::Always`], [`Condition::Default`] (when no other edge of
//! that node was taken) — or on a [`Predicate`] over its output: equals, not-equals, in, exists,
//! numeric comparisons and regex matches on a JSON path, combined with all / any / not.
//!
//! Evaluation is pure and total: a missing path, a value of the wrong type or a string that does
//! not match simply make a predicate false (and `ne` true), never an error, so a decision taken
//! while deciding replays the same, byte for byte. What can be wrong — a malformed path, a regex
//! that does not compile, a condition nested too deep — is refused when the graph is submitted
//! ([`Predicate::validate`]).
//!
//! JSON form (what the declarative definitions use):
//!
//! ```json
//! "on_success"
//! {"output": {"op": "eq", "path": "$.status", "value": "approved"}}
//! {"output": {"op": "all", "of": [{"op": "gt", "path": "$.score", "value": 0.5},
//!                                 {"op": "regex", "path": "$.region", "pattern": "^eu-"}]}}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Deepest nesting of all / any / not in one predicate.
pub const PREDICATE_DEPTH_MAX: usize = 16;
/// Most leaf tests in one predicate.
pub const PREDICATE_TERMS_MAX: usize = 64;
/// Longest JSON path, in bytes.
pub const PATH_BYTES_MAX: usize = 256;
/// Longest regex pattern, in bytes.
pub const PATTERN_BYTES_MAX: usize = 1024;
/// Most memory a compiled regex may take (the regex crate's size limit), in bytes.
pub const REGEX_COMPILED_BYTES_MAX: usize = 1 << 20;

/// When an edge is taken, judged on its source node's outcome.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// The source succeeded.
    OnSuccess,
    /// The source failed.
    OnFailure,
    /// The source finished, whatever its outcome.
    Always,
    /// No other edge of the source was taken.
    Default,
    /// The source succeeded and its output satisfies the predicate.
    Output(Predicate),
}

/// A test on a JSON value (a node's output).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Predicate {
    /// The value at `path` equals `value`.
    Eq { path: String, value: Value },
    /// The value at `path` is missing or differs from `value`.
    Ne { path: String, value: Value },
    /// The value at `path` equals one of `values`.
    In { path: String, values: Vec<Value> },
    /// Something (even `null`) is at `path`.
    Exists { path: String },
    /// The number at `path` is greater than `value`.
    Gt { path: String, value: f64 },
    /// The number at `path` is at least `value`.
    Ge { path: String, value: f64 },
    /// The number at `path` is less than `value`.
    Lt { path: String, value: f64 },
    /// The number at `path` is at most `value`.
    Le { path: String, value: f64 },
    /// The string at `path` matches `pattern` (the regex crate's syntax, unanchored).
    Regex { path: String, pattern: String },
    /// Every one of `of` holds (true when empty).
    All { of: Vec<Predicate> },
    /// At least one of `of` holds (false when empty).
    Any { of: Vec<Predicate> },
    /// `of` does not hold.
    Not { of: Box<Predicate> },
    /// The predicate registered in Rust under `name` (the engine's `Registry::predicate`)
    /// holds for the value at `path` (`null` when missing). One not registered where the graph
    /// routes holds for nothing; the engine refuses a graph naming one it does not know.
    Named { name: String, path: String },
}

/// Longest name of a named predicate, in bytes.
pub const PREDICATE_NAME_BYTES_MAX: usize = 128;

/// The predicates code registered by name, as the decider consults them when a graph routes
/// ([`Predicate::Named`]). Whatever one answers is recorded in the routing event, so replay
/// never calls it again.
pub trait NamedPredicates {
    /// Whether predicate `name` holds for `value`; `None` when there is no such predicate.
    fn test(&self, name: &str, value: &Value) -> Option<bool>;
}

/// No named predicates (the pure core's own tests, the simulator): every one holds for nothing.
pub struct NoNamedPredicates;

impl NamedPredicates for NoNamedPredicates {
    fn test(&self, _: &str, _: &Value) -> Option<bool> {
        None
    }
}

/// Why a condition cannot be evaluated; refused at submission.
#[derive(Clone, PartialEq, Debug, thiserror::Error)]
pub enum ConditionError {
    #[error("JSON path {path:?} is malformed: {why}")]
    Path { path: String, why: &'static str },
    #[error("regex {pattern:?} does not compile: {why}")]
    Regex { pattern: String, why: String },
    #[error("predicate nested deeper than {PREDICATE_DEPTH_MAX} levels")]
    TooDeep,
    #[error("predicate has more than {PREDICATE_TERMS_MAX} tests")]
    TooManyTerms,
    #[error("comparison with {0}, which is not a finite number")]
    NotFinite(f64),
    #[error("predicate name {0:?} is empty or longer than {PREDICATE_NAME_BYTES_MAX} bytes")]
    BadName(String),
}

/// One step of a JSON path.
#[derive(Clone, PartialEq, Debug)]
enum Segment {
    Key(String),
    Index(usize),
}

/// Parse `$`, `$.a.b`, `$.items[0].name`, `$["odd key"]` (a leading `$` is optional).
fn parse_path(path: &str) -> Result<Vec<Segment>, ConditionError> {
    let bad = |why| ConditionError::Path {
        path: path.into(),
        why,
    };
    if path.len() > PATH_BYTES_MAX {
        return Err(bad("too long"));
    }
    let rest = path.strip_prefix('$').unwrap_or(path);
    let mut segments = Vec::new();
    let mut chars = rest.char_indices().peekable();
    // A path without `$` may start with a bare key.
    let mut expect_key = !path.starts_with('$') && !rest.is_empty();
    while expect_key || chars.peek().is_some() {
        if expect_key {
            expect_key = false;
        } else {
            match chars.next() {
                Some((_, '.')) => {}
                Some((_, '[')) => {
                    let start = chars.peek().map_or(rest.len(), |(i, _)| *i);
                    let end = rest[start..].find(']').ok_or_else(|| bad("unclosed ["))? + start;
                    let inner = &rest[start..end];
                    let segment = if let Some(quoted) =
                        inner.strip_prefix('"').and_then(|s| s.strip_suffix('"'))
                    {
                        Segment::Key(quoted.to_string())
                    } else {
                        Segment::Index(inner.parse().map_err(|_| bad("index is not a number"))?)
                    };
                    segments.push(segment);
                    while chars.peek().is_some_and(|(i, _)| *i <= end) {
                        chars.next();
                    }
                    continue;
                }
                _ => return Err(bad("expected . or [")),
            }
        }
        let start = chars.peek().map_or(rest.len(), |(i, _)| *i);
        let mut end = start;
        while let Some(&(i, c)) = chars.peek() {
            if c == '.' || c == '[' {
                break;
            }
            end = i + c.len_utf8();
            chars.next();
        }
        if end == start {
            return Err(bad("empty key"));
        }
        segments.push(Segment::Key(rest[start..end].to_string()));
    }
    Ok(segments)
}

/// The value at `path` in `value`, if any (a malformed path finds nothing).
pub fn lookup<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    let segments = parse_path(path).ok()?;
    segments.iter().try_fold(value, |v, s| match s {
        Segment::Key(k) => v.get(k.as_str()),
        Segment::Index(i) => v.get(*i),
    })
}

impl Predicate {
    /// Refuse what could never be evaluated as meant: a malformed path, a regex that does not
    /// compile (or would take more than [`REGEX_COMPILED_BYTES_MAX`]), a comparison with a
    /// non-finite number, a predicate too deep or too large.
    pub fn validate(&self) -> Result<(), ConditionError> {
        let mut terms = 0;
        self.validate_at(0, &mut terms)
    }

    fn validate_at(&self, depth: usize, terms: &mut usize) -> Result<(), ConditionError> {
        if depth >= PREDICATE_DEPTH_MAX {
            return Err(ConditionError::TooDeep);
        }
        match self {
            Predicate::All { of } | Predicate::Any { of } => {
                of.iter().try_for_each(|p| p.validate_at(depth + 1, terms))
            }
            Predicate::Not { of } => of.validate_at(depth + 1, terms),
            leaf => {
                *terms += 1;
                if *terms > PREDICATE_TERMS_MAX {
                    return Err(ConditionError::TooManyTerms);
                }
                parse_path(leaf.path().unwrap_or("$"))?;
                match leaf {
                    Predicate::Gt { value, .. }
                    | Predicate::Ge { value, .. }
                    | Predicate::Lt { value, .. }
                    | Predicate::Le { value, .. }
                        if !value.is_finite() =>
                    {
                        Err(ConditionError::NotFinite(*value))
                    }
                    Predicate::Regex { pattern, .. } => compile(pattern).map(drop),
                    Predicate::Named { name, .. }
                        if name.is_empty() || name.len() > PREDICATE_NAME_BYTES_MAX =>
                    {
                        Err(ConditionError::BadName(name.chars().take(64).collect()))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    fn path(&self) -> Option<&str> {
        match self {
            Predicate::Eq { path, .. }
            | Predicate::Ne { path, .. }
            | Predicate::In { path, .. }
            | Predicate::Exists { path }
            | Predicate::Gt { path, .. }
            | Predicate::Ge { path, .. }
            | Predicate::Lt { path, .. }
            | Predicate::Le { path, .. }
            | Predicate::Regex { path, .. }
            | Predicate::Named { path, .. } => Some(path),
            Predicate::All { .. } | Predicate::Any { .. } | Predicate::Not { .. } => None,
        }
    }

    /// Whether `output` satisfies this predicate. Total: never fails, never panics.
    pub fn holds(&self, output: &Value) -> bool {
        self.eval(output).0
    }

    /// Whether `output` satisfies this predicate, and what it saw: for a test, the value at its
    /// path (`null` when missing); for all / any / not, what each part saw. What a routing
    /// event records, so history shows why a branch ran. Named predicates hold for nothing
    /// here: see [`Predicate::eval_with`].
    pub fn eval(&self, output: &Value) -> (bool, Value) {
        self.eval_with(output, &NoNamedPredicates)
    }

    /// [`Predicate::eval`], consulting `named` for [`Predicate::Named`].
    pub fn eval_with(&self, output: &Value, named: &dyn NamedPredicates) -> (bool, Value) {
        let at = |path: &str| lookup(output, path);
        let seen = |path: &str| at(path).cloned().unwrap_or(Value::Null);
        let number = |path: &str| at(path).and_then(Value::as_f64);
        match self {
            Predicate::Eq { path, value } => (at(path) == Some(value), seen(path)),
            Predicate::Ne { path, value } => (at(path) != Some(value), seen(path)),
            Predicate::In { path, values } => {
                (at(path).is_some_and(|v| values.contains(v)), seen(path))
            }
            Predicate::Exists { path } => (at(path).is_some(), seen(path)),
            Predicate::Gt { path, value } => (number(path).is_some_and(|n| n > *value), seen(path)),
            Predicate::Ge { path, value } => {
                (number(path).is_some_and(|n| n >= *value), seen(path))
            }
            Predicate::Lt { path, value } => (number(path).is_some_and(|n| n < *value), seen(path)),
            Predicate::Le { path, value } => {
                (number(path).is_some_and(|n| n <= *value), seen(path))
            }
            Predicate::Regex { path, pattern } => {
                let matched = match (at(path).and_then(Value::as_str), compile(pattern)) {
                    (Some(s), Ok(re)) => re.is_match(s),
                    _ => false,
                };
                (matched, seen(path))
            }
            Predicate::Named { name, path } => {
                let value = seen(path);
                (named.test(name, &value) == Some(true), value)
            }
            Predicate::All { of } => {
                let parts: Vec<(bool, Value)> =
                    of.iter().map(|p| p.eval_with(output, named)).collect();
                let ok = parts.iter().all(|(b, _)| *b);
                (
                    ok,
                    json!(parts.into_iter().map(|(_, v)| v).collect::<Vec<_>>()),
                )
            }
            Predicate::Any { of } => {
                let parts: Vec<(bool, Value)> =
                    of.iter().map(|p| p.eval_with(output, named)).collect();
                let ok = parts.iter().any(|(b, _)| *b);
                (
                    ok,
                    json!(parts.into_iter().map(|(_, v)| v).collect::<Vec<_>>()),
                )
            }
            Predicate::Not { of } => {
                let (b, saw) = of.eval_with(output, named);
                (!b, saw)
            }
        }
    }
}

fn compile(pattern: &str) -> Result<regex::Regex, ConditionError> {
    let err = |why: String| ConditionError::Regex {
        pattern: pattern.chars().take(64).collect(),
        why,
    };
    if pattern.len() > PATTERN_BYTES_MAX {
        return Err(err(format!("longer than {PATTERN_BYTES_MAX} bytes")));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_COMPILED_BYTES_MAX)
        .build()
        .map_err(|e| err(e.to_string()))
}

impl Condition {
    /// The names of the named predicates this condition uses.
    pub fn predicate_names(&self) -> Vec<&str> {
        let mut names = Vec::new();
        let mut stack: Vec<&Predicate> = match self {
            Condition::Output(p) => vec![p],
            _ => Vec::new(),
        };
        while let Some(p) = stack.pop() {
            match p {
                Predicate::Named { name, .. } => names.push(name.as_str()),
                Predicate::All { of } | Predicate::Any { of } => stack.extend(of),
                Predicate::Not { of } => stack.push(of),
                _ => {}
            }
        }
        names
    }

    /// Refuse a condition that could never be evaluated as meant (see [`Predicate::validate`]).
    pub fn validate(&self) -> Result<(), ConditionError> {
        match self {
            Condition::Output(p) => p.validate(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_predicates_ask_the_registry_and_hold_for_nothing_unknown() {
        struct Even;
        impl NamedPredicates for Even {
            fn test(&self, name: &str, v: &Value) -> Option<bool> {
                (name == "even").then(|| v.as_u64().is_some_and(|n| n % 2 == 0))
            }
        }
        let even = |path: &str| Predicate::Named {
            name: "even".into(),
            path: path.into(),
        };
        let out = json!({"n": 4, "m": 3});
        assert_eq!(even("$.n").eval_with(&out, &Even), (true, json!(4)));
        assert_eq!(even("$.m").eval_with(&out, &Even), (false, json!(3)));
        assert_eq!(even("$.gone").eval_with(&out, &Even), (false, Value::Null));
        // Without the registry (or under another name) it holds for nothing.
        assert_eq!(even("$.n").eval(&out), (false, json!(4)));
        let not = Predicate::Not {
            of: Box::new(even("$.m")),
        };
        assert!(not.eval_with(&out, &Even).0);
        assert_eq!(
            Condition::Output(Predicate::All {
                of: vec![even("$.n"), not]
            })
            .predicate_names(),
            ["even", "even"]
        );
        let nameless = Predicate::Named {
            name: String::new(),
            path: "$".into(),
        };
        assert!(matches!(
            nameless.validate(),
            Err(ConditionError::BadName(_))
        ));
    }

    #[test]
    fn paths_parse_and_find() {
        let v = json!({"a": {"b": [10, {"c": "x"}]}, "odd key": 1});
        assert_eq!(lookup(&v, "$"), Some(&v));
        assert_eq!(lookup(&v, "$.a.b[0]"), Some(&json!(10)));
        assert_eq!(lookup(&v, "a.b[1].c"), Some(&json!("x")));
        assert_eq!(lookup(&v, "$[\"odd key\"]"), Some(&json!(1)));
        assert_eq!(lookup(&v, "$.a.missing"), None);
        assert_eq!(lookup(&v, "$.a.b[7]"), None);
        for bad in ["$.", "$..a", "$[", "$[x]", "$a", "a..b"] {
            assert!(parse_path(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn predicates_are_total_and_record_what_they_saw() {
        let out = json!({"status": "approved", "score": 0.7, "region": "eu-west"});
        let p = Predicate::All {
            of: vec![
                Predicate::Eq {
                    path: "$.status".into(),
                    value: json!("approved"),
                },
                Predicate::Gt {
                    path: "$.score".into(),
                    value: 0.5,
                },
                Predicate::Regex {
                    path: "$.region".into(),
                    pattern: "^eu-".into(),
                },
            ],
        };
        assert_eq!(p.eval(&out), (true, json!(["approved", 0.7, "eu-west"])));
        let missing = Predicate::Gt {
            path: "$.nope".into(),
            value: 0.0,
        };
        assert_eq!(missing.eval(&out), (false, Value::Null));
        assert!(Predicate::Ne {
            path: "$.nope".into(),
            value: json!(1)
        }
        .holds(&out));
        assert!(!Predicate::Any { of: vec![] }.holds(&out));
        assert!(Predicate::All { of: vec![] }.holds(&out));
    }

    #[test]
    fn what_cannot_be_evaluated_is_refused() {
        let regex = Predicate::Regex {
            path: "$.a".into(),
            pattern: "(".into(),
        };
        assert!(matches!(
            regex.validate(),
            Err(ConditionError::Regex { .. })
        ));
        let path = Predicate::Exists { path: "$..".into() };
        assert!(matches!(path.validate(), Err(ConditionError::Path { .. })));
        let mut deep = Predicate::Exists { path: "$".into() };
        for _ in 0..PREDICATE_DEPTH_MAX {
            deep = Predicate::Not { of: Box::new(deep) };
        }
        assert_eq!(deep.validate(), Err(ConditionError::TooDeep));
        let wide = Predicate::Any {
            of: vec![Predicate::Exists { path: "$".into() }; PREDICATE_TERMS_MAX + 1],
        };
        assert_eq!(wide.validate(), Err(ConditionError::TooManyTerms));
    }

    #[test]
    fn json_form_round_trips() {
        let c: Condition = serde_json::from_value(
            json!({"output": {"op": "in", "path": "$.k", "values": [1, 2]}}),
        )
        .expect("parses");
        assert_eq!(
            c,
            Condition::Output(Predicate::In {
                path: "$.k".into(),
                values: vec![json!(1), json!(2)]
            })
        );
        let d: Condition = serde_json::from_value(json!("default")).expect("parses");
        assert_eq!(d, Condition::Default);
    }
}
