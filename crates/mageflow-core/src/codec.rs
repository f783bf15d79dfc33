//! The one place core types become bytes: MessagePack (rmp-serde) with named fields, so that
//! fields can be added later (with defaults) and every event stored today keeps decoding.
//! Golden files of encoded events live in `tests/golden/` and a test decodes them.

use crate::event::{Event, SCHEMA_VERSION};

/// Largest encoded event accepted, in bytes. Larger input is refused before decoding.
pub const EVENT_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Deepest nesting of arrays and maps accepted when decoding (the event's own structure
/// included). Decoding recurses once per level: without this bound a few hundred bytes of
/// corrupt input overflow a 2 MiB thread stack and abort the process. Well above serde_json's
/// own parse limit (128), so any JSON the API accepts still fits.
pub const EVENT_DEPTH_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("event is {len} bytes, more than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("event bytes are not a valid encoded event: {0}")]
    Malformed(String),
    #[error("event has schema version {found}, newer than this build understands ({supported})")]
    UnsupportedSchema { found: u16, supported: u16 },
    #[error("cannot encode event: {0}")]
    Encode(String),
}

/// Encode an event.
pub fn encode(event: &Event) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(256);
    encode_into(event, &mut buf)?;
    Ok(buf)
}

/// Encode an event, appending to `buf`.
pub fn encode_into(event: &Event, buf: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = buf.len();
    rmp_serde::encode::write_named(buf, event).map_err(|e| CodecError::Encode(e.to_string()))?;
    let len = buf.len() - start;
    if len > EVENT_BYTES_MAX {
        buf.truncate(start);
        return Err(CodecError::TooLarge {
            len,
            max: EVENT_BYTES_MAX,
        });
    }
    Ok(())
}

/// Decode an event from untrusted bytes: never panics, every failure is a [`CodecError`].
pub fn decode(bytes: &[u8]) -> Result<Event, CodecError> {
    if bytes.len() > EVENT_BYTES_MAX {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            max: EVENT_BYTES_MAX,
        });
    }
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
    de.set_max_depth(EVENT_DEPTH_MAX);
    let event: Event = serde::Deserialize::deserialize(&mut de)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    let used = de.position() as usize;
    if used != bytes.len() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after the event",
            bytes.len() - used
        )));
    }
    if event.schema > SCHEMA_VERSION {
        return Err(CodecError::UnsupportedSchema {
            found: event.schema,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(event)
}
