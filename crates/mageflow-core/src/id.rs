//! Typed identifiers. A workflow (one root signature tree) is one stream of the log; every
//! signature inside it is addressed by the workflow id plus a dense index, so a signature id alone
//! tells which stream holds it. Ids never come from a clock or a random source here: the engine
//! passes fresh ones in, or derives them deterministically with [`WorkflowId::derive`].

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Id of a workflow = id of the log stream holding it. Time-ordered (UUIDv7) when fresh.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkflowId(pub Uuid);

impl WorkflowId {
    /// The reserved system stream (the nil UUID): engine records such as resume reports
    /// ([`crate::Payload::ResumeReport`]). It holds no workflow: [`crate::Workflow::apply`]
    /// refuses its events and `decide` refuses every command on it. Fresh ids (UUIDv7) and
    /// derived ones (UUIDv8) are never nil.
    pub const SYSTEM: WorkflowId = WorkflowId(Uuid::nil());

    /// Whether this is the reserved [`WorkflowId::SYSTEM`] stream.
    pub fn is_system(&self) -> bool {
        *self == Self::SYSTEM
    }

    pub fn from_u128(v: u128) -> Self {
        Self(Uuid::from_u128(v))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Deterministic id of the `n`-th workflow created by an attempt of `parent`: a retried
    /// handler that creates workflows in the same order gets the same ids, so a retry never
    /// duplicates a workflow. The result is a UUIDv8 (custom) so it never collides with a v7.
    pub fn derive(parent: SignatureId, n: u32) -> Self {
        let seed = parent.workflow.0.as_u128()
            ^ (u128::from(parent.index) << 32)
            ^ u128::from(n).rotate_left(96);
        let hi = splitmix64(seed as u64 ^ splitmix64((seed >> 64) as u64));
        let lo = splitmix64(hi ^ (seed >> 64) as u64 ^ u64::from(n));
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&hi.to_be_bytes());
        bytes[8..].copy_from_slice(&lo.to_be_bytes());
        Self(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl fmt::Display for WorkflowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wf_{}", self.0.simple())
    }
}

impl fmt::Debug for WorkflowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Index of a signature inside its workflow. The root is always 0.
pub type NodeIndex = u32;

/// Id of one signature (task, chain, swarm, callback) anywhere in the system.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SignatureId {
    pub workflow: WorkflowId,
    pub index: NodeIndex,
}

impl SignatureId {
    pub fn root(workflow: WorkflowId) -> Self {
        Self { workflow, index: 0 }
    }
}

/// A workflow id names its root signature.
impl From<WorkflowId> for SignatureId {
    fn from(workflow: WorkflowId) -> Self {
        Self::root(workflow)
    }
}

impl fmt::Display for SignatureId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sig_{}.{}", self.workflow.0.simple(), self.index)
    }
}

impl fmt::Debug for SignatureId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {input:?}: expected {expected}")]
pub struct ParseIdError {
    pub input: String,
    pub expected: &'static str,
}

impl FromStr for WorkflowId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError {
            input: s.to_owned(),
            expected: "wf_<32 hex digits>",
        };
        let hex = s.strip_prefix("wf_").ok_or_else(err)?;
        Uuid::try_parse(hex).map(WorkflowId).map_err(|_| err())
    }
}

impl FromStr for SignatureId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError {
            input: s.to_owned(),
            expected: "sig_<32 hex digits>.<index>",
        };
        let rest = s.strip_prefix("sig_").ok_or_else(err)?;
        let (hex, index) = rest.split_once('.').ok_or_else(err)?;
        let workflow = Uuid::try_parse(hex).map(WorkflowId).map_err(|_| err())?;
        let index = index.parse().map_err(|_| err())?;
        Ok(Self { workflow, index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_strings() {
        let wf = WorkflowId::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let sig = SignatureId {
            workflow: wf,
            index: 42,
        };
        assert_eq!(wf.to_string().parse::<WorkflowId>(), Ok(wf));
        assert_eq!(sig.to_string().parse::<SignatureId>(), Ok(sig));
        assert!("sig_nothex.1".parse::<SignatureId>().is_err());
        assert!("wf_".parse::<WorkflowId>().is_err());
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let parent = SignatureId::root(WorkflowId::from_u128(7));
        let a = WorkflowId::derive(parent, 0);
        assert_eq!(a, WorkflowId::derive(parent, 0));
        assert_ne!(a, WorkflowId::derive(parent, 1));
        let other = SignatureId { index: 1, ..parent };
        assert_ne!(a, WorkflowId::derive(other, 0));
    }
}
