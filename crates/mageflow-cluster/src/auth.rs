//! Who may write history on a PostgreSQL + Redis deployment, as the orchestrator's report
//! intake checks it. Anything that can reach Redis can add entries to the reports stream, so
//! nothing there is taken on trust:
//!
//! - A worker's report (an outcome, a checkpoint, a handler's submit or command) counts only if
//!   it is signed with the deployment's worker secret (`HotConfig::secret`, when set) **and**
//!   names the lease token that holds its attempt's job now — a token only the claiming worker
//!   was handed. A report from a made-up worker, from a worker whose lease expired, or from
//!   before a wipe of the hot tier is refused and logged on the `mageflow::security` target.
//! - An operator's command counts only if it is signed with that operator's token, the
//!   operator's role allows it ([`Role::allows`]), and it arrives before its deadline; a
//!   replayed command (its nonce seen before under another stream id) is refused.
//! - With neither a worker secret nor operator tokens the deployment is *open*: signatures are
//!   not required (leases and deadlines still are), and anyone who can write to Redis can
//!   write history. `mageflow serve` warns about it at start.
//!
//! This module decides; it does no I/O (the lease lookup is the intake's).

pub use mageflow_engine::control::{validate_principal, ControlOp, Role, PRINCIPAL_BYTES_MAX};
use mageflow_engine::{Error, Result};
pub use mageflow_hot::auth::{random_token, Secret, SecretError};
use mageflow_hot::{Received, Report, ReportOutcome};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// The longest an operator command may stay valid, in ms: a deadline further ahead is refused
/// (it bounds how long a captured command could be replayed, and the nonces kept to stop it).
pub const COMMAND_TTL_MS_MAX: u64 = 10 * 60 * 1000;

/// One operator's credentials.
#[derive(Clone, Debug)]
pub struct Operator {
    pub role: Role,
    /// Signs the operator's commands; known to the operator and the orchestrator only.
    pub token: Secret,
}

/// The operators a deployment accepts commands from, by principal.
#[derive(Clone, Debug, Default)]
pub struct Operators(pub BTreeMap<String, Operator>);

/// An access file, as `mageflow serve --auth FILE` reads it (TOML):
///
/// ```toml
/// [[operator]]
/// principal = "alice"
/// role = "operator"          # viewer | auditor | operator | admin
/// token = "a long random string"
/// ```
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct AccessFile {
    #[serde(default)]
    pub operator: Vec<OperatorEntry>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct OperatorEntry {
    pub principal: String,
    pub role: Role,
    pub token: String,
}

impl Operators {
    /// The operators of an access file: principals valid and distinct, tokens long enough.
    pub fn from_file(file: AccessFile) -> Result<Self> {
        let mut out = BTreeMap::new();
        for e in file.operator {
            validate_principal(&e.principal)?;
            let token = Secret::new(&e.token).map_err(|err| Error::InvalidInput {
                task: "(access file)".into(),
                reason: format!("the token of operator {:?}: {err}", e.principal),
            })?;
            let op = Operator {
                role: e.role,
                token,
            };
            if out.insert(e.principal.clone(), op).is_some() {
                return Err(Error::InvalidInput {
                    task: "(access file)".into(),
                    reason: format!("operator {:?} is listed twice", e.principal),
                });
            }
        }
        Ok(Self(out))
    }
}

/// What the intake requires of the reports it reads.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The deployment's worker secret (the same as the workers' `HotConfig::secret`).
    pub workers: Option<Secret>,
    pub operators: Operators,
}

impl Policy {
    /// Neither signatures of workers nor of operators are required.
    pub fn is_open(&self) -> bool {
        self.workers.is_none() && self.operators.0.is_empty()
    }

    /// A worker's report: signed with the worker secret, if there is one. (Its lease is
    /// checked by [`check_lease`].)
    pub fn check_worker(&self, r: &Received) -> Result<()> {
        match &self.workers {
            Some(secret) if !r.signed_by(secret) => Err(Error::Unauthenticated(format!(
                "report {} from {:?} is not signed with the deployment's worker secret",
                r.id, r.report.worker
            ))),
            _ => Ok(()),
        }
    }

    /// An operator's command `op` as `principal`: a valid principal; on a deployment that is
    /// not open, a known operator whose token signed it and whose role allows `op`.
    pub fn check_operator(&self, r: &Received, principal: &str, op: ControlOp) -> Result<()> {
        validate_principal(principal)?;
        if self.is_open() {
            return Ok(());
        }
        let Some(operator) = self.operators.0.get(principal) else {
            return Err(Error::Unauthenticated(format!(
                "{principal:?} is no operator of this deployment (its access file lists the \
                 operators and their tokens)"
            )));
        };
        if !r.signed_by(&operator.token) {
            return Err(Error::Unauthenticated(format!(
                "command {} is not signed with the token of {principal:?}",
                r.id
            )));
        }
        if !operator.role.allows(op) {
            return Err(Error::Forbidden(format!(
                "{principal:?} is a {} and may not {op}",
                operator.role
            )));
        }
        Ok(())
    }
}

/// A worker's report names the lease it holds its attempt's job under; `holder` is the lease
/// that holds the job now (`None`: none, the attempt ended or the hot tier was rebuilt).
pub fn check_lease(r: &Received, holder: Option<&str>) -> Result<()> {
    let key = r.report.key;
    match (r.report.lease.as_deref(), holder) {
        (Some(named), Some(holder)) if named == holder => Ok(()),
        (None, _) => Err(Error::Unauthenticated(format!(
            "report {} from {:?} about {key} names no lease",
            r.id, r.report.worker
        ))),
        _ => Err(Error::LeaseLost {
            sig: key.sig,
            attempt: key.attempt,
        }),
    }
}

/// Whether a report comes from a worker (about its claimed job, under its lease), rather than
/// from an operator.
pub fn from_worker(r: &Report) -> bool {
    !matches!(r.outcome, ReportOutcome::Control { target: None, .. })
}

/// Whether a report read from the stream counts, at `now_ms`: a worker's must be signed (if the
/// deployment has a worker secret) and name `lease`, the lease that holds its job now; an
/// operator's must be signed by an operator allowed to give it, and come before its deadline,
/// once. The intake's whole decision over untrusted bytes (fuzzed: `fuzz/`).
pub fn admit(
    policy: &Policy,
    replays: &mut Replays,
    r: &Received,
    lease: Option<&str>,
    now_ms: u64,
) -> Result<()> {
    if from_worker(&r.report) {
        policy.check_worker(r)?;
        return check_lease(r, lease);
    }
    let ReportOutcome::Control {
        op,
        principal,
        deadline_ms,
        nonce,
        ..
    } = &r.report.outcome
    else {
        return Ok(());
    };
    policy.check_operator(r, principal, op.parse::<ControlOp>()?)?;
    replays.check(&r.id, *deadline_ms, nonce, now_ms)
}

/// The deadline and nonce check of operator commands, with the nonces seen until their
/// deadlines pass.
#[derive(Debug, Default)]
pub struct Replays {
    /// nonce → (stream id it came with, deadline ms).
    seen: HashMap<String, (String, u64)>,
}

impl Replays {
    /// Whether the command in stream entry `id`, with `deadline_ms` and `nonce`, may be carried
    /// out at `now_ms`: before its deadline, not too far ahead, and not seen before under
    /// another id (the same id is the same entry read again, after a restart say).
    pub fn check(&mut self, id: &str, deadline_ms: u64, nonce: &str, now_ms: u64) -> Result<()> {
        self.seen.retain(|_, (_, deadline)| *deadline >= now_ms);
        if deadline_ms == 0 {
            return Err(Error::Expired("the command carries no deadline".into()));
        }
        if now_ms > deadline_ms {
            return Err(Error::Expired(format!(
                "the command's deadline passed {} ms before it was read (no orchestrator \
                 read it in time); it was not carried out",
                now_ms - deadline_ms
            )));
        }
        if deadline_ms - now_ms > COMMAND_TTL_MS_MAX {
            return Err(Error::Expired(format!(
                "the command's deadline is {} ms ahead, more than the {COMMAND_TTL_MS_MAX} ms a \
                 command may stay valid",
                deadline_ms - now_ms
            )));
        }
        if nonce.is_empty() {
            return Err(Error::Unauthenticated(
                "the command carries no nonce".into(),
            ));
        }
        match self.seen.get(nonce) {
            Some((first, _)) if first != id => Err(Error::Unauthenticated(format!(
                "the command replays {first} (same nonce)"
            ))),
            _ => {
                self.seen
                    .insert(nonce.to_owned(), (id.to_owned(), deadline_ms));
                Ok(())
            }
        }
    }
}

/// What the `decode_report` fuzz target (and the replay of its corpus) runs: `data` as a
/// stream entry — the report's JSON before the first newline, its MAC after — through
/// [`admit`], with and without a worker secret.
#[doc(hidden)]
pub fn fuzz_report(data: &[u8]) -> bool {
    let Some((raw, mac)) = fuzz_entry(data) else {
        return false;
    };
    let Ok(r) = Received::parse("1-0".into(), raw, mac) else {
        return false;
    };
    let secured = Policy {
        workers: Secret::new("fuzz-worker-secret").ok(),
        operators: Operators::default(),
    };
    for policy in [Policy::default(), secured] {
        let lease = r.report.lease.clone();
        let _ = admit(&policy, &mut Replays::default(), &r, lease.as_deref(), 1);
        let _ = admit(&policy, &mut Replays::default(), &r, None, 1);
    }
    true
}

/// What the `decode_command` fuzz target runs: `data` as an operator's command entry through
/// [`admit`] on an open deployment and on one with an operator `fuzz` whose token is
/// `fuzz-operator-token`, read at several instants.
#[doc(hidden)]
pub fn fuzz_command(data: &[u8]) -> bool {
    let Some((raw, mac)) = fuzz_entry(data) else {
        return false;
    };
    let Ok(r) = Received::parse("1-0".into(), raw, mac) else {
        return false;
    };
    let mut operators = BTreeMap::new();
    if let Ok(token) = Secret::new("fuzz-operator-token") {
        operators.insert(
            "fuzz".to_owned(),
            Operator {
                role: Role::Operator,
                token,
            },
        );
    }
    let secured = Policy {
        workers: None,
        operators: Operators(operators),
    };
    let mut replays = Replays::default();
    for policy in [&Policy::default(), &secured] {
        for now in [0, 1, u64::MAX / 2, u64::MAX] {
            let _ = admit(policy, &mut replays, &r, None, now);
        }
    }
    true
}

fn fuzz_entry(data: &[u8]) -> Option<(String, Option<String>)> {
    let s = std::str::from_utf8(data).ok()?;
    Some(match s.split_once('\n') {
        Some((raw, mac)) => (raw.to_owned(), Some(mac.to_owned())),
        None => (s.to_owned(), None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mageflow_core::{SignatureId, WorkflowId};
    use mageflow_hot::JobKey;

    fn received(report: &Report, secret: Option<&Secret>) -> Received {
        let raw = serde_json::to_string(report).expect("a report encodes");
        let mac = secret.map(|s| s.sign(raw.as_bytes()));
        Received::parse("1-0".into(), raw, mac).expect("a report decodes")
    }

    fn key() -> JobKey {
        JobKey {
            sig: SignatureId::root(WorkflowId::from_u128(7)),
            attempt: 1,
        }
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s).expect("long enough")
    }

    fn succeeded(lease: Option<&str>) -> Report {
        Report {
            key: key(),
            worker: "w1".into(),
            outcome: ReportOutcome::Succeeded(serde_json::json!(1)),
            lease: lease.map(str::to_owned),
        }
    }

    #[test]
    fn worker_reports_need_the_worker_secret_and_the_lease_that_holds_the_job() {
        let workers = secret("the-workers-secret");
        let policy = Policy {
            workers: Some(workers.clone()),
            ..Policy::default()
        };
        let good = received(&succeeded(Some("L1")), Some(&workers));
        assert!(policy.check_worker(&good).is_ok());
        assert!(check_lease(&good, Some("L1")).is_ok());
        // A forged result: unsigned, or signed with a guess.
        let forged = received(&succeeded(Some("L1")), None);
        assert_eq!(
            policy.check_worker(&forged).map_err(|e| e.code()),
            Err("unauthenticated")
        );
        let guessed = received(
            &succeeded(Some("L1")),
            Some(&secret("not-the-workers-secret")),
        );
        assert!(policy.check_worker(&guessed).is_err());
        // A signed report whose bytes were changed after signing.
        let mut altered = good.clone();
        altered.raw = altered.raw.replace("\"w1\"", "\"w2\"");
        assert!(policy.check_worker(&altered).is_err());
        // A stale lease, no lease held, no lease named.
        assert_eq!(
            check_lease(&good, Some("L2")).map_err(|e| e.code()),
            Err("lease_lost")
        );
        assert!(check_lease(&good, None).is_err());
        let unleased = received(&succeeded(None), Some(&workers));
        assert_eq!(
            check_lease(&unleased, Some("L1")).map_err(|e| e.code()),
            Err("unauthenticated")
        );
    }

    fn command(principal: &str) -> Report {
        Report {
            key: key(),
            worker: format!("operator:{principal}"),
            outcome: ReportOutcome::Control {
                op: "cancel".into(),
                confirmed: true,
                principal: principal.into(),
                deadline_ms: 10,
                nonce: "n".into(),
                target: None,
                value: None,
            },
            lease: None,
        }
    }

    #[test]
    fn operator_commands_need_a_known_operator_its_token_and_a_role_that_allows_them() {
        let (alice, bob) = (
            secret("alice-token-0123456"),
            secret("bob-token-0123456789"),
        );
        let file = AccessFile {
            operator: vec![
                OperatorEntry {
                    principal: "alice".into(),
                    role: Role::Operator,
                    token: "alice-token-0123456".into(),
                },
                OperatorEntry {
                    principal: "bob".into(),
                    role: Role::Viewer,
                    token: "bob-token-0123456789".into(),
                },
            ],
        };
        let policy = Policy {
            workers: None,
            operators: Operators::from_file(file).expect("valid"),
        };
        let code = |r: Result<()>| r.map_err(|e| e.code());
        let cancel = ControlOp::Cancel;
        let by_alice = received(&command("alice"), Some(&alice));
        assert_eq!(
            code(policy.check_operator(&by_alice, "alice", cancel)),
            Ok(())
        );
        let unsigned = received(&command("alice"), None);
        assert_eq!(
            code(policy.check_operator(&unsigned, "alice", cancel)),
            Err("unauthenticated")
        );
        let as_alice_by_bob = received(&command("alice"), Some(&bob));
        assert!(policy
            .check_operator(&as_alice_by_bob, "alice", cancel)
            .is_err());
        let by_bob = received(&command("bob"), Some(&bob));
        assert_eq!(
            code(policy.check_operator(&by_bob, "bob", cancel)),
            Err("forbidden")
        );
        let by_mallory = received(&command("mallory"), Some(&bob));
        assert_eq!(
            code(policy.check_operator(&by_mallory, "mallory", cancel)),
            Err("unauthenticated")
        );
        // An open deployment takes any valid principal, and still no forged line of history.
        let open = Policy::default();
        assert!(open.check_operator(&unsigned, "alice", cancel).is_ok());
        assert_eq!(
            code(open.check_operator(&unsigned, "eve\nfake line", cancel)),
            Err("invalid_principal")
        );
    }

    #[test]
    fn access_files_refuse_short_tokens_bad_principals_and_duplicates() {
        let entry = |p: &str, t: &str| OperatorEntry {
            principal: p.into(),
            role: Role::Admin,
            token: t.into(),
        };
        let long = "a-long-enough-token";
        for bad in [
            vec![entry("a", "short")],
            vec![entry("", long)],
            vec![entry("a", long), entry("a", long)],
        ] {
            assert!(Operators::from_file(AccessFile { operator: bad }).is_err());
        }
    }

    #[test]
    fn commands_are_refused_past_their_deadline_too_far_ahead_or_replayed() {
        let mut r = Replays::default();
        let code = |r: Result<()>| r.map_err(|e| e.code());
        assert_eq!(code(r.check("1-0", 0, "n0", 100)), Err("expired"));
        assert_eq!(code(r.check("1-0", 99, "n1", 100)), Err("expired"));
        assert_eq!(
            code(r.check("1-0", 100 + COMMAND_TTL_MS_MAX + 1, "n2", 100)),
            Err("expired")
        );
        assert_eq!(code(r.check("1-0", 200, "n3", 100)), Ok(()));
        // The same entry read again (a restart): fine. Another entry, same nonce: a replay.
        assert_eq!(code(r.check("1-0", 200, "n3", 150)), Ok(()));
        assert_eq!(code(r.check("2-0", 200, "n3", 150)), Err("unauthenticated"));
        // Nonces are forgotten once their deadline passed: a replay then is past it too.
        assert_eq!(code(r.check("3-0", 200, "n3", 201)), Err("expired"));
        assert!(r.seen.is_empty());
    }
}
