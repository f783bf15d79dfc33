//! Who may write to the hot tier's reports stream, and how the orchestrator tells.
//!
//! Anything that can reach Redis can `XADD` to `<prefix>reports`. So every report a worker
//! sends is signed with the deployment's worker secret, and every operator command with the
//! operator's own token: the stream entry carries the report's JSON exactly as it was signed
//! (`report`) and an HMAC-SHA256 of it (`mac`, lowercase hex). The orchestrator checks the MAC
//! over those bytes before it reads them as a report, so no parsing and re-encoding can make
//! two encodings of one report disagree. This module only signs and checks; what is required
//! of whom is the orchestrator's policy (`mageflow::auth`).
//!
//! It must not log or print a secret: [`Secret`]'s `Debug` shows its length only.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::sync::Arc;

/// Shortest secret accepted, in bytes: a guessable secret would make signing pointless.
pub const SECRET_BYTES_MIN: usize = 16;
/// Longest secret accepted, in bytes.
pub const SECRET_BYTES_MAX: usize = 1024;

/// A shared secret (the workers' deployment secret, or one operator's token).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

/// Why a secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a secret must be at least {SECRET_BYTES_MIN} bytes long (it is {0})")]
    TooShort(usize),
    #[error("a secret must be at most {SECRET_BYTES_MAX} bytes long (it is {0})")]
    TooLong(usize),
}

impl Secret {
    /// A secret of `SECRET_BYTES_MIN..=SECRET_BYTES_MAX` bytes (surrounding whitespace, say a
    /// secret file's final newline, is not part of it).
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Self, SecretError> {
        let bytes = bytes.as_ref().trim_ascii();
        match bytes.len() {
            n if n < SECRET_BYTES_MIN => Err(SecretError::TooShort(n)),
            n if n > SECRET_BYTES_MAX => Err(SecretError::TooLong(n)),
            _ => Ok(Self(bytes.into())),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        }
    }

    /// The MAC of `message`, as lowercase hex.
    pub fn sign(&self, message: &[u8]) -> String {
        let mut m = self.mac();
        m.update(message);
        hex(&m.finalize().into_bytes())
    }

    /// Whether `mac_hex` is the MAC of `message` under this secret (compared in constant time).
    pub fn verify(&self, message: &[u8], mac_hex: &str) -> bool {
        let Some(tag) = unhex(mac_hex) else {
            return false;
        };
        let mut m = self.mac();
        m.update(message);
        m.verify_slice(&tag).is_ok()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// A fresh random token of 128 bits, as hex (a lease token, a command's nonce).
pub fn random_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_verifies_only_its_message_under_its_secret() {
        let a = Secret::new("0123456789abcdef-a").expect("long enough");
        let b = Secret::new("0123456789abcdef-b").expect("long enough");
        let mac = a.sign(b"report");
        assert_eq!(mac.len(), 64);
        assert!(a.verify(b"report", &mac));
        assert!(!a.verify(b"reporT", &mac));
        assert!(!b.verify(b"report", &mac));
        assert!(!a.verify(b"report", &mac[..62]));
        assert!(!a.verify(b"report", "zz"));
        assert!(!a.verify(b"report", ""));
    }

    #[test]
    fn short_secrets_are_refused_and_debug_hides_the_bytes() {
        assert_eq!(Secret::new("short\n"), Err(SecretError::TooShort(5)));
        let s = Secret::new("a-long-enough-secret\n").expect("long enough");
        assert_eq!(format!("{s:?}"), "Secret(20 bytes)");
        assert!(Secret::new(vec![b'x'; SECRET_BYTES_MAX + 1]).is_err());
    }
}
