//! API tokens: random, shown once, stored hashed (SHA-256) in a tokens file with a name and a
//! role (`viewer` reads, `auditor` also reads history, `operator` also controls and submits,
//! `admin` everything). The name is the principal every control call records as its actor.
//! On a PostgreSQL + Redis deployment the same file authorises the CLI's relayed commands
//! ([`relay_key`]): a token that may not cancel over HTTP may not through the relay either.
//!
//! The file is TOML, written by `mageflow token create|revoke` and read by `mageflow serve
//! --tokens FILE`:
//!
//! ```toml
//! [[token]]
//! name = "alice"
//! role = "operator"
//! sha256 = "…64 hex digits…"
//! ```

use mageflow_engine::control::{validate_principal, Role};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Bytes of randomness in a token.
pub const TOKEN_RANDOM_BYTES: usize = 32;
/// What every token starts with (so a leaked one is recognisable in logs and scanners).
pub const TOKEN_PREFIX: &str = "mft_";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read or write the tokens file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("the tokens file {path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
    #[error("a token named {0:?} exists already (revoke it first)")]
    Exists(String),
    #[error("no token is named {0:?}")]
    NoSuchToken(String),
    #[error("no randomness for a token: {0}")]
    Random(String),
    #[error("{0}")]
    Name(String),
}

/// One token as stored: its name, role and hash (never the token).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredToken {
    pub name: String,
    #[serde(with = "role_name")]
    pub role: Role,
    pub sha256: String,
}

mod role_name {
    use mageflow_engine::control::Role;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(role: &Role, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(role.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// The tokens a server accepts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    #[serde(default, rename = "token")]
    pub tokens: Vec<StoredToken>,
}

fn digest(token: &str) -> String {
    let hash = Sha256::digest(token.as_bytes());
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key a relayed operator command (`mageflow cancel … --postgres … --redis …`) is signed
/// with when the operator holds an API token: the token's SHA-256, which the tokens file
/// stores — so one token, one role, for the API and the relay alike.
pub fn relay_key(token: &str) -> String {
    digest(token)
}

impl Tokens {
    /// Read a tokens file; a missing file is an empty set.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(TokenError::File {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
            }
        };
        toml::from_str(&text).map_err(|e| TokenError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    fn save(&self, path: &Path) -> Result<(), TokenError> {
        let text = toml::to_string(self).map_err(|e| TokenError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // Written aside and renamed: a crash leaves the old file or the new one.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| TokenError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    /// Create a token named `name` with `role` in the file at `path`; returns the token (the
    /// only time it is seen: the file keeps its hash).
    pub fn create(path: &Path, name: &str, role: Role) -> Result<String, TokenError> {
        validate_principal(name).map_err(|e| TokenError::Name(e.to_string()))?;
        let mut tokens = Self::load(path)?;
        if tokens.tokens.iter().any(|t| t.name == name) {
            return Err(TokenError::Exists(name.to_owned()));
        }
        let mut random = [0u8; TOKEN_RANDOM_BYTES];
        getrandom::getrandom(&mut random).map_err(|e| TokenError::Random(e.to_string()))?;
        let token = format!(
            "{TOKEN_PREFIX}{}",
            random
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        tokens.tokens.push(StoredToken {
            name: name.to_owned(),
            role,
            sha256: digest(&token),
        });
        tokens.save(path)?;
        Ok(token)
    }

    /// Remove the token named `name`: requests with it are refused from the server's next
    /// start (or reload).
    pub fn revoke(path: &Path, name: &str) -> Result<(), TokenError> {
        let mut tokens = Self::load(path)?;
        let before = tokens.tokens.len();
        tokens.tokens.retain(|t| t.name != name);
        if tokens.tokens.len() == before {
            return Err(TokenError::NoSuchToken(name.to_owned()));
        }
        tokens.save(path)
    }

    /// Who presents `token`, if anyone.
    pub fn check(&self, token: &str) -> Option<&StoredToken> {
        let hash = digest(token);
        self.tokens.iter().find(|t| t.sha256 == hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_shown_once_stored_hashed_and_revoked() -> Result<(), TokenError> {
        let dir = tempfile::tempdir().map_err(|e| TokenError::Random(e.to_string()))?;
        let path = dir.path().join("tokens.toml");
        let token = Tokens::create(&path, "alice", Role::Operator)?;
        assert!(token.starts_with(TOKEN_PREFIX));
        let text = std::fs::read_to_string(&path).map_err(|e| TokenError::Random(e.to_string()))?;
        assert!(!text.contains(&token), "the token itself is not stored");
        let tokens = Tokens::load(&path)?;
        assert_eq!(tokens.check(&token).map(|t| t.role), Some(Role::Operator));
        assert!(tokens.check("mft_guess").is_none());
        assert!(matches!(
            Tokens::create(&path, "alice", Role::Viewer),
            Err(TokenError::Exists(_))
        ));
        Tokens::revoke(&path, "alice")?;
        assert!(Tokens::load(&path)?.check(&token).is_none());
        assert!(matches!(
            Tokens::revoke(&path, "alice"),
            Err(TokenError::NoSuchToken(_))
        ));
        Ok(())
    }
}
