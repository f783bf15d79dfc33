//! The one place core types become bytes: MessagePack, in rmp-serde's compact form.
//! Golden files of encoded events live in `tests/golden/` and a test decodes them.
//!
//! # Layout
//!
//! - A struct (and the fields of a struct variant) is an array of its fields in declaration
//!   order: no field names. This halves the size of a typical event and is much cheaper to
//!   decode than a map keyed by names.
//! - An enum variant is identified by its snake_case **name**, never by its index: a unit variant
//!   is the name as a string, a variant with fields is a one-entry map `{name: [fields...]}`.
//! - `serde_json::Value`s are plain MessagePack maps, arrays and scalars.
//!
//! # Evolving the schema (forward compatibility)
//!
//! Every event ever written must keep decoding. Because fields are positional:
//!
//! - a new field may only be **appended at the end** of its struct or variant, with
//!   `#[serde(default)]`, so that older, shorter arrays still decode (like `lost` in
//!   `Payload::RetryScheduled` and `retry` in `KindSpec::Task`);
//! - never reorder, remove, or change the type of a field; never rename or reuse a variant name
//!   (new variants are fine);
//! - no `skip_serializing_if`, `flatten`, `untagged` or `skip` on encoded types: each breaks the
//!   positional layout;
//! - bump [`SCHEMA_VERSION`] whenever fields or variants are added, so an older build reading a
//!   newer event reports [`CodecError::UnsupportedSchema`] rather than garbage;
//! - add the new shape to the golden files (a new directory, old ones are never re-blessed).
//!
//! Events written before the compact form (structs as maps keyed by field name, golden files in
//! `tests/golden/events-v1/`) still decode: serde's struct visitors accept both forms.
//!
//! # Encoding and decoding
//!
//! [`encode`] writes the layout directly (byte for byte what `rmp_serde::encode::write` writes
//! for the same event, which a property test checks), without going through serde's visitors
//! and `io::Write` for every marker.
//!
//! [`decode`] first tries a direct reader of exactly the layout [`encode`] writes (no serde
//! visitors, borrowed strings, no intermediate copies). Anything else (the older named form, a
//! non-canonical but valid encoding, malformed input) goes to the serde decoder, which is the
//! reference: the direct reader only ever accepts input the serde decoder decodes to the same
//! event (a property test checks this on arbitrary and damaged bytes), and every error comes from
//! the serde decoder.

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
    fast::write_event(buf, event);
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
    let event = match fast::event(bytes) {
        Some(event) => event,
        None => decode_serde(bytes).map_err(|err| match fast::schema(bytes) {
            // An event of a newer build may not fit this build's types at all: say so.
            Some(found) if found > SCHEMA_VERSION => CodecError::UnsupportedSchema {
                found,
                supported: SCHEMA_VERSION,
            },
            _ => err,
        })?,
    };
    if event.schema > SCHEMA_VERSION {
        return Err(CodecError::UnsupportedSchema {
            found: event.schema,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(event)
}

/// The reference decoder (serde), without the size and schema checks of [`decode`].
fn decode_serde(bytes: &[u8]) -> Result<Event, CodecError> {
    // Read straight from the slice: strings and byte strings are borrowed, not copied into a
    // scratch buffer as they are through `io::Read`.
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(EVENT_DEPTH_MAX);
    let event: Event = serde::Deserialize::deserialize(&mut de)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if !at_end(&mut de) {
        return Err(CodecError::Malformed(match trailing_bytes(bytes) {
            Some(n) => format!("{n} trailing bytes after the event"),
            None => "trailing bytes after the event".to_owned(),
        }));
    }
    Ok(event)
}

/// Whether the deserializer has consumed all its input. The slice reader does not tell its
/// position, so this asks for one more value: an empty reader fails to produce its first byte.
/// It reads at most one byte and never recurses.
fn at_end<'de, R: rmp_serde::decode::ReadSlice<'de>>(de: &mut rmp_serde::Deserializer<R>) -> bool {
    struct Probe;
    impl<'de> serde::de::Visitor<'de> for Probe {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("anything")
        }
        fn visit_none<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
            Ok(())
        }
    }
    match serde::Deserializer::deserialize_option(de, Probe) {
        Ok(()) => false,
        Err(rmp_serde::decode::Error::InvalidMarkerRead(e)) => {
            e.kind() == std::io::ErrorKind::UnexpectedEof
        }
        Err(_) => false,
    }
}

/// Number of bytes after the first encoded event (error path only: decodes again through a
/// reader that counts).
#[cold]
fn trailing_bytes(bytes: &[u8]) -> Option<usize> {
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
    de.set_max_depth(EVENT_DEPTH_MAX);
    <Event as serde::Deserialize>::deserialize(&mut de).ok()?;
    Some(bytes.len() - usize::try_from(de.position()).ok()?)
}

/// Hooks for the tests that hold the direct reader to the serde decoder. Not a public API.
#[doc(hidden)]
pub mod check {
    use super::*;

    /// The direct reader alone: `None` where [`decode`] would fall back to serde.
    pub fn decode_direct(bytes: &[u8]) -> Option<Event> {
        fast::event(bytes)
    }

    /// The compact layout as rmp-serde writes it (`rmp_serde::encode::write`): [`encode`]'s
    /// direct writer must produce exactly these bytes.
    pub fn encode_reference(event: &Event) -> Result<Vec<u8>, CodecError> {
        rmp_serde::to_vec(event).map_err(|e| CodecError::Encode(e.to_string()))
    }

    /// The serde decoder alone, without [`decode`]'s size and schema checks.
    pub fn decode_reference(bytes: &[u8]) -> Result<Event, CodecError> {
        decode_serde(bytes)
    }
}

/// The direct writer and reader of the compact layout.
///
/// The writer must write exactly what rmp-serde writes. Every reader function returns `None` on
/// anything it does not expect, and [`decode`] then hands the bytes to serde; so the reader may
/// be stricter than serde (it is: canonical markers, exact array lengths, string keys only, no
/// `f32`, values at most [`fast::VALUE_DEPTH_MAX`] deep) but must never accept what serde refuses
/// nor read anything differently.
mod fast {
    use crate::event::{Actor, EdgeDecision, Event, Payload};
    use crate::id::WorkflowId;
    use crate::model::{
        ItemCallbacks, KindSpec, Link, Message, NodeSpec, RetryPolicy, Role, Status, SwarmConfig,
        TaskError,
    };
    use crate::time::Timestamp;
    use serde_json::{Map, Value};

    /// Deepest JSON value read here (serde_json's own parse limit); deeper ones go to serde, which
    /// applies [`super::EVENT_DEPTH_MAX`]. With the at most four levels of event structure around
    /// a value, everything read here is well inside that limit.
    pub(super) const VALUE_DEPTH_MAX: usize = 128;

    /// Capacity to reserve for a sequence of `len` elements announced by untrusted input: as
    /// serde does, at most 1 MiB up front (the vector grows if the elements really are there).
    fn cautious<T>(len: usize) -> usize {
        len.min(1024 * 1024 / std::mem::size_of::<T>().max(1))
    }

    pub(super) fn event(bytes: &[u8]) -> Option<Event> {
        let mut r = Reader {
            bytes,
            pos: 0,
            depth: 0,
        };
        r.array_of(6)?;
        let event = Event {
            stream: r.workflow_id()?,
            seq: r.uint()?,
            at: Timestamp(r.i64()?),
            actor: r.actor()?,
            schema: r.u16()?,
            payload: r.payload()?,
        };
        (r.pos == bytes.len()).then_some(event)
    }

    /// The schema version an event claims, read without decoding the rest (compact or named
    /// form), for the error of an event this build cannot decode.
    pub(super) fn schema(bytes: &[u8]) -> Option<u16> {
        let mut r = Reader {
            bytes,
            pos: 0,
            depth: 0,
        };
        match r.peek()? {
            0x90..=0x9f | 0xdc | 0xdd => {
                if r.array()? < 5 {
                    return None;
                }
                for _ in 0..4 {
                    r.skip(super::EVENT_DEPTH_MAX)?;
                }
                r.u16()
            }
            _ => {
                for _ in 0..r.map_len()? {
                    if r.str()? == "schema" {
                        return r.u16();
                    }
                    r.skip(super::EVENT_DEPTH_MAX)?;
                }
                None
            }
        }
    }

    /// Append `event` in the compact layout, exactly as `rmp_serde::encode::write` would.
    pub(super) fn write_event(buf: &mut Vec<u8>, event: &Event) {
        let Event {
            stream,
            seq,
            at,
            actor,
            schema,
            payload,
        } = event;
        let w = &mut Writer(buf);
        w.array(6);
        w.bin(stream.as_bytes());
        w.uint(*seq);
        w.int(at.0);
        match actor {
            Actor::Api { principal: s } => w.variant("api", 1).str(s),
            Actor::Worker { id: s } => w.variant("worker", 1).str(s),
            Actor::System { component: s } => w.variant("system", 1).str(s),
        }
        w.uint(u64::from(*schema));
        w.payload(payload);
    }

    /// MessagePack writer with rmp's choice of markers (the smallest that fits).
    struct Writer<'a>(&'a mut Vec<u8>);

    impl Writer<'_> {
        #[inline]
        fn byte(&mut self, b: u8) {
            self.0.push(b);
        }

        #[inline]
        fn bytes(&mut self, b: &[u8]) {
            self.0.extend_from_slice(b);
        }

        /// A length in rmp's three forms: `fix` (below `fix_max`), 16 or 32 bits. Lengths past
        /// `u32::MAX` are cut as rmp cuts them; such an event is refused as too large anyway.
        #[inline]
        fn len(&mut self, len: usize, fix: u8, fix_max: usize, m16: u8, m32: u8) {
            if len < fix_max {
                self.byte(fix | len as u8);
            } else if len <= usize::from(u16::MAX) {
                self.byte(m16);
                self.bytes(&(len as u16).to_be_bytes());
            } else {
                self.byte(m32);
                self.bytes(&(len as u32).to_be_bytes());
            }
        }

        fn array(&mut self, len: usize) {
            self.len(len, 0x90, 16, 0xdc, 0xdd);
        }

        fn map(&mut self, len: usize) {
            self.len(len, 0x80, 16, 0xde, 0xdf);
        }

        fn str(&mut self, s: &str) {
            let len = s.len();
            if len < 32 {
                self.byte(0xa0 | len as u8);
            } else if len < 256 {
                self.bytes(&[0xd9, len as u8]);
            } else {
                self.len(len, 0, 0, 0xda, 0xdb);
            }
            self.bytes(s.as_bytes());
        }

        fn bin(&mut self, b: &[u8]) {
            if b.len() < 256 {
                self.bytes(&[0xc4, b.len() as u8]);
            } else {
                self.len(b.len(), 0, 0, 0xc5, 0xc6);
            }
            self.bytes(b);
        }

        fn bool(&mut self, v: bool) {
            self.byte(if v { 0xc3 } else { 0xc2 });
        }

        fn nil(&mut self) {
            self.byte(0xc0);
        }

        fn uint(&mut self, v: u64) {
            if v < 128 {
                self.byte(v as u8);
            } else if v < 256 {
                self.bytes(&[0xcc, v as u8]);
            } else if v < 65_536 {
                self.byte(0xcd);
                self.bytes(&(v as u16).to_be_bytes());
            } else if v < 4_294_967_296 {
                self.byte(0xce);
                self.bytes(&(v as u32).to_be_bytes());
            } else {
                self.byte(0xcf);
                self.bytes(&v.to_be_bytes());
            }
        }

        fn int(&mut self, v: i64) {
            if v >= 0 {
                self.uint(v as u64);
            } else if v >= -32 {
                self.byte(v as i8 as u8);
            } else if v >= -128 {
                self.bytes(&[0xd0, v as i8 as u8]);
            } else if v >= -32_768 {
                self.byte(0xd1);
                self.bytes(&(v as i16).to_be_bytes());
            } else if v >= -2_147_483_648 {
                self.byte(0xd2);
                self.bytes(&(v as i32).to_be_bytes());
            } else {
                self.byte(0xd3);
                self.bytes(&v.to_be_bytes());
            }
        }

        /// The start of a variant with fields: `{name: [` then the caller writes `fields`
        /// values.
        fn variant(&mut self, name: &str, fields: usize) -> &mut Self {
            self.map(1);
            self.str(name);
            self.array(fields);
            self
        }

        fn payload(&mut self, payload: &Payload) {
            let name = payload.kind();
            match payload {
                Payload::WorkflowCreated { nodes } => {
                    self.variant(name, 1).node_specs(nodes);
                }
                Payload::SwarmItemsAdded { swarm, nodes } => {
                    self.variant(name, 2).uint(u64::from(*swarm));
                    self.node_specs(nodes);
                }
                Payload::SwarmClosed { swarm: node }
                | Payload::Suspended { node }
                | Payload::Interrupted { node }
                | Payload::Canceled { node }
                | Payload::Restored { node }
                | Payload::Rerun { node }
                | Payload::Purged { node } => {
                    self.variant(name, 1).uint(u64::from(*node));
                }
                Payload::MarkedForDeletion { node, expires_at } => {
                    self.variant(name, 2).uint(u64::from(*node));
                    self.int(expires_at.0);
                }
                Payload::PriorityChanged { node, priority } => {
                    self.variant(name, 2).uint(u64::from(*node));
                    self.int(i64::from(*priority));
                }
                Payload::KwargsUpdated { node, kwargs } => {
                    self.variant(name, 2).uint(u64::from(*node));
                    self.value(kwargs);
                }
                Payload::Queued {
                    node,
                    message,
                    parked,
                }
                | Payload::ContainerStarted {
                    node,
                    message,
                    parked,
                } => {
                    self.variant(name, 3).uint(u64::from(*node));
                    let Message { value, as_result } = message;
                    self.array(2);
                    self.value(value);
                    self.bool(*as_result);
                    self.bool(*parked);
                }
                Payload::SwarmDispatched {
                    swarm: node,
                    count: n,
                }
                | Payload::Started { node, attempt: n } => {
                    self.variant(name, 2).uint(u64::from(*node));
                    self.uint(u64::from(*n));
                }
                Payload::Checkpointed {
                    node,
                    attempt,
                    data: value,
                }
                | Payload::Succeeded {
                    node,
                    attempt,
                    result: value,
                } => {
                    self.variant(name, 3).uint(u64::from(*node));
                    self.uint(u64::from(*attempt));
                    self.value(value);
                }
                Payload::RetryScheduled {
                    node,
                    attempt,
                    error,
                    retry_at,
                    lost,
                } => {
                    self.variant(name, 5).uint(u64::from(*node));
                    self.uint(u64::from(*attempt));
                    self.task_error(error);
                    self.int(retry_at.0);
                    self.bool(*lost);
                }
                Payload::Failed {
                    node,
                    attempt,
                    error,
                } => {
                    self.variant(name, 3).uint(u64::from(*node));
                    self.uint(u64::from(*attempt));
                    self.task_error(error);
                }
                Payload::ResumeReport { report } => {
                    self.variant(name, 1).value(report);
                }
                Payload::CommandRefused { command } => {
                    self.variant(name, 1).value(command);
                }
                Payload::GraphRouted {
                    graph,
                    from,
                    decisions,
                    skipped,
                } => {
                    self.variant(name, 4).uint(u64::from(*graph));
                    self.uint(u64::from(*from));
                    self.array(decisions.len());
                    for EdgeDecision { edge, taken, saw } in decisions {
                        self.array(3);
                        self.uint(u64::from(*edge));
                        self.bool(*taken);
                        self.value(saw);
                    }
                    self.bool(*skipped);
                }
                Payload::Resumed { node, status } => {
                    self.variant(name, 2).uint(u64::from(*node));
                    match status {
                        Status::MarkedForDeletion { expires_at } => {
                            self.variant("marked_for_deletion", 1).int(expires_at.0);
                        }
                        Status::Pending => self.str("pending"),
                        Status::Queued => self.str("queued"),
                        Status::Running => self.str("running"),
                        Status::Suspended => self.str("suspended"),
                        Status::Interrupted => self.str("interrupted"),
                        Status::Canceled => self.str("canceled"),
                        Status::Done => self.str("done"),
                        Status::Failed => self.str("failed"),
                        Status::Skipped => self.str("skipped"),
                    }
                }
            }
        }

        fn task_error(&mut self, error: &TaskError) {
            let TaskError { message, retryable } = error;
            self.array(2);
            self.str(message);
            self.bool(*retryable);
        }

        fn node_specs(&mut self, nodes: &[NodeSpec]) {
            self.array(nodes.len());
            for n in nodes {
                // Destructured without `..`: a field added to the model does not compile here
                // until it is written.
                let NodeSpec {
                    name,
                    kind,
                    kwargs,
                    parent,
                    on_success,
                    on_error,
                    return_field,
                    on_cleanup,
                    priority,
                } = n;
                // The priority (schema 6) is a ninth field, written only when it is not 0.
                self.array(if *priority == 0 { 8 } else { 9 });
                self.str(name);
                match kind {
                    KindSpec::Task { task, retry } => {
                        let RetryPolicy {
                            max_retries,
                            backoff_ms,
                            backoff_max_ms,
                        } = retry;
                        self.variant("task", 2).str(task);
                        self.array(3);
                        self.uint(u64::from(*max_retries));
                        self.uint(*backoff_ms);
                        self.uint(*backoff_max_ms);
                    }
                    KindSpec::Chain { children } => {
                        self.variant("chain", 1).indexes(children);
                    }
                    // Graphs are rare and their conditions varied: rmp-serde writes them (the
                    // same bytes, as the property test holds it), and the reader leaves them to
                    // the serde fallback.
                    // A unit variant: its name alone (as rmp-serde writes it).
                    KindSpec::Gate => {
                        self.str("gate");
                    }
                    graph @ KindSpec::Graph { .. } => {
                        if rmp_serde::encode::write(&mut *self.0, graph).is_err() {
                            // Unreachable for these types (string keys, no custom serializers);
                            // a nil makes the event fail to decode rather than misread.
                            self.nil();
                        }
                    }
                    KindSpec::Swarm {
                        children,
                        config,
                        closed,
                        item_callbacks,
                    } => {
                        let SwarmConfig {
                            max_concurrency,
                            stop_after_n_failures,
                        } = config;
                        // Per-item callbacks (schema 6) are a fourth field, written only when
                        // there are some: a swarm without keeps the bytes of schema 5.
                        let fields = if item_callbacks.is_empty() { 3 } else { 4 };
                        self.variant("swarm", fields).indexes(children);
                        self.array(2);
                        self.uint(u64::from(*max_concurrency));
                        match stop_after_n_failures {
                            Some(n) => self.uint(u64::from(*n)),
                            None => self.nil(),
                        }
                        self.bool(*closed);
                        if !item_callbacks.is_empty() {
                            let ItemCallbacks {
                                on_success,
                                on_error,
                            } = item_callbacks;
                            self.array(2);
                            self.node_specs(on_success);
                            self.node_specs(on_error);
                        }
                    }
                }
                self.value(kwargs);
                match *parent {
                    None => self.nil(),
                    Some(Link { node, role }) => {
                        self.array(2);
                        self.uint(u64::from(node));
                        self.str(match role {
                            Role::Child => "child",
                            Role::SuccessCallback => "success_callback",
                            Role::ErrorCallback => "error_callback",
                            Role::Cleanup => "cleanup",
                        });
                    }
                }
                self.indexes(on_success);
                self.indexes(on_error);
                self.str(return_field);
                self.indexes(on_cleanup);
                if *priority != 0 {
                    self.int(i64::from(*priority));
                }
            }
        }

        fn indexes(&mut self, indexes: &[u32]) {
            self.array(indexes.len());
            for &i in indexes {
                self.uint(u64::from(i));
            }
        }

        /// A JSON value as serde_json serializes it: integers as the smallest unsigned or
        /// signed marker, floats as 64 bits.
        fn value(&mut self, v: &Value) {
            match v {
                Value::Null => self.nil(),
                Value::Bool(b) => self.bool(*b),
                Value::Number(n) => {
                    if let Some(u) = n.as_u64() {
                        self.uint(u);
                    } else if let Some(i) = n.as_i64() {
                        self.int(i);
                    } else {
                        self.byte(0xcb);
                        self.bytes(&n.as_f64().unwrap_or(f64::NAN).to_be_bytes());
                    }
                }
                Value::String(s) => self.str(s),
                Value::Array(items) => {
                    self.array(items.len());
                    for item in items {
                        self.value(item);
                    }
                }
                Value::Object(map) => {
                    self.map(map.len());
                    for (k, item) in map {
                        self.str(k);
                        self.value(item);
                    }
                }
            }
        }
    }

    struct Reader<'a> {
        bytes: &'a [u8],
        pos: usize,
        /// Per-item callback templates entered (they nest: a template can hold a swarm with
        /// templates of its own); deeper than [`super::EVENT_DEPTH_MAX`] is left to the serde decoder,
        /// which refuses it without overflowing the stack.
        depth: usize,
    }

    impl<'a> Reader<'a> {
        #[inline]
        fn peek(&self) -> Option<u8> {
            self.bytes.get(self.pos).copied()
        }

        #[inline]
        fn byte(&mut self) -> Option<u8> {
            let b = self.peek()?;
            self.pos += 1;
            Some(b)
        }

        #[inline]
        fn take(&mut self, len: usize) -> Option<&'a [u8]> {
            let end = self.pos.checked_add(len)?;
            let s = self.bytes.get(self.pos..end)?;
            self.pos = end;
            Some(s)
        }

        #[inline]
        fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
            self.take(N)?.try_into().ok()
        }

        fn len8(&mut self) -> Option<usize> {
            self.byte().map(usize::from)
        }

        fn len16(&mut self) -> Option<usize> {
            Some(usize::from(u16::from_be_bytes(self.be()?)))
        }

        fn len32(&mut self) -> Option<usize> {
            usize::try_from(u32::from_be_bytes(self.be()?)).ok()
        }

        fn array(&mut self) -> Option<usize> {
            match self.byte()? {
                b @ 0x90..=0x9f => Some(usize::from(b & 0x0f)),
                0xdc => self.len16(),
                0xdd => self.len32(),
                _ => None,
            }
        }

        fn array_of(&mut self, len: usize) -> Option<()> {
            (self.array()? == len).then_some(())
        }

        fn map_len(&mut self) -> Option<usize> {
            match self.byte()? {
                b @ 0x80..=0x8f => Some(usize::from(b & 0x0f)),
                0xde => self.len16(),
                0xdf => self.len32(),
                _ => None,
            }
        }

        fn str(&mut self) -> Option<&'a str> {
            let len = match self.byte()? {
                b @ 0xa0..=0xbf => usize::from(b & 0x1f),
                0xd9 => self.len8()?,
                0xda => self.len16()?,
                0xdb => self.len32()?,
                _ => return None,
            };
            std::str::from_utf8(self.take(len)?).ok()
        }

        fn string(&mut self) -> Option<String> {
            self.str().map(str::to_owned)
        }

        fn bool(&mut self) -> Option<bool> {
            match self.byte()? {
                0xc2 => Some(false),
                0xc3 => Some(true),
                _ => None,
            }
        }

        /// Unsigned integer markers only (what the encoder writes for unsigned fields).
        fn uint(&mut self) -> Option<u64> {
            match self.byte()? {
                b @ 0x00..=0x7f => Some(u64::from(b)),
                0xcc => Some(u64::from(u8::from_be_bytes(self.be()?))),
                0xcd => Some(u64::from(u16::from_be_bytes(self.be()?))),
                0xce => Some(u64::from(u32::from_be_bytes(self.be()?))),
                0xcf => Some(u64::from_be_bytes(self.be()?)),
                _ => None,
            }
        }

        fn u32(&mut self) -> Option<u32> {
            u32::try_from(self.uint()?).ok()
        }

        fn u16(&mut self) -> Option<u16> {
            u16::try_from(self.uint()?).ok()
        }

        /// Any integer marker (the encoder writes non-negative signed values as unsigned).
        fn i64(&mut self) -> Option<i64> {
            match self.peek()? {
                0x00..=0x7f | 0xcc..=0xcf => i64::try_from(self.uint()?).ok(),
                b @ 0xe0..=0xff => {
                    self.pos += 1;
                    Some(i64::from(b as i8))
                }
                0xd0 => Some(i64::from(i8::from_be_bytes(self.after_marker()?))),
                0xd1 => Some(i64::from(i16::from_be_bytes(self.after_marker()?))),
                0xd2 => Some(i64::from(i32::from_be_bytes(self.after_marker()?))),
                0xd3 => Some(i64::from_be_bytes(self.after_marker()?)),
                _ => None,
            }
        }

        fn after_marker<const N: usize>(&mut self) -> Option<[u8; N]> {
            self.byte()?;
            self.be()
        }

        /// The start of a variant with fields, `{name: [fields...]}`: reads the one-entry map
        /// header and the name, and returns the name (the caller reads the fields).
        fn variant(&mut self) -> Option<&'a str> {
            if self.map_len()? != 1 {
                return None;
            }
            self.str()
        }

        fn fields(&mut self, len: usize) -> Option<()> {
            self.array_of(len)
        }

        fn workflow_id(&mut self) -> Option<WorkflowId> {
            // `Uuid` in a binary format: 16 bytes (bin 8).
            if self.byte()? != 0xc4 || self.byte()? != 16 {
                return None;
            }
            Some(WorkflowId(uuid::Uuid::from_bytes(self.be()?)))
        }

        fn actor(&mut self) -> Option<Actor> {
            let name = self.variant()?;
            self.fields(1)?;
            let s = self.string()?;
            Some(match name {
                "api" => Actor::Api { principal: s },
                "worker" => Actor::Worker { id: s },
                "system" => Actor::System { component: s },
                _ => return None,
            })
        }

        fn payload(&mut self) -> Option<Payload> {
            let name = self.variant()?;
            Some(match name {
                "workflow_created" => {
                    self.fields(1)?;
                    Payload::WorkflowCreated {
                        nodes: self.node_specs()?,
                    }
                }
                "swarm_items_added" => {
                    self.fields(2)?;
                    Payload::SwarmItemsAdded {
                        swarm: self.u32()?,
                        nodes: self.node_specs()?,
                    }
                }
                "swarm_closed" => {
                    self.fields(1)?;
                    Payload::SwarmClosed { swarm: self.u32()? }
                }
                "priority_changed" => {
                    self.fields(2)?;
                    Payload::PriorityChanged {
                        node: self.u32()?,
                        priority: i32::try_from(self.i64()?).ok()?,
                    }
                }
                "kwargs_updated" => {
                    self.fields(2)?;
                    Payload::KwargsUpdated {
                        node: self.u32()?,
                        kwargs: self.value(VALUE_DEPTH_MAX)?,
                    }
                }
                "queued" => {
                    self.fields(3)?;
                    Payload::Queued {
                        node: self.u32()?,
                        message: self.message()?,
                        parked: self.bool()?,
                    }
                }
                "container_started" => {
                    self.fields(3)?;
                    Payload::ContainerStarted {
                        node: self.u32()?,
                        message: self.message()?,
                        parked: self.bool()?,
                    }
                }
                "swarm_dispatched" => {
                    self.fields(2)?;
                    Payload::SwarmDispatched {
                        swarm: self.u32()?,
                        count: self.u32()?,
                    }
                }
                "started" => {
                    self.fields(2)?;
                    Payload::Started {
                        node: self.u32()?,
                        attempt: self.u32()?,
                    }
                }
                "checkpointed" => {
                    self.fields(3)?;
                    Payload::Checkpointed {
                        node: self.u32()?,
                        attempt: self.u32()?,
                        data: self.value(VALUE_DEPTH_MAX)?,
                    }
                }
                "succeeded" => {
                    self.fields(3)?;
                    Payload::Succeeded {
                        node: self.u32()?,
                        attempt: self.u32()?,
                        result: self.value(VALUE_DEPTH_MAX)?,
                    }
                }
                "retry_scheduled" => {
                    self.fields(5)?;
                    Payload::RetryScheduled {
                        node: self.u32()?,
                        attempt: self.u32()?,
                        error: self.task_error()?,
                        retry_at: Timestamp(self.i64()?),
                        lost: self.bool()?,
                    }
                }
                "failed" => {
                    self.fields(3)?;
                    Payload::Failed {
                        node: self.u32()?,
                        attempt: self.u32()?,
                        error: self.task_error()?,
                    }
                }
                "suspended" => {
                    self.fields(1)?;
                    Payload::Suspended { node: self.u32()? }
                }
                "resumed" => {
                    self.fields(2)?;
                    Payload::Resumed {
                        node: self.u32()?,
                        status: self.status()?,
                    }
                }
                "interrupted" => {
                    self.fields(1)?;
                    Payload::Interrupted { node: self.u32()? }
                }
                "canceled" => {
                    self.fields(1)?;
                    Payload::Canceled { node: self.u32()? }
                }
                "marked_for_deletion" => {
                    self.fields(2)?;
                    Payload::MarkedForDeletion {
                        node: self.u32()?,
                        expires_at: Timestamp(self.i64()?),
                    }
                }
                "restored" => {
                    self.fields(1)?;
                    Payload::Restored { node: self.u32()? }
                }
                "rerun" => {
                    self.fields(1)?;
                    Payload::Rerun { node: self.u32()? }
                }
                "purged" => {
                    self.fields(1)?;
                    Payload::Purged { node: self.u32()? }
                }
                "resume_report" => {
                    self.fields(1)?;
                    Payload::ResumeReport {
                        report: self.value(VALUE_DEPTH_MAX)?,
                    }
                }
                "command_refused" => {
                    self.fields(1)?;
                    Payload::CommandRefused {
                        command: self.value(VALUE_DEPTH_MAX)?,
                    }
                }
                "graph_routed" => {
                    self.fields(4)?;
                    let graph = self.u32()?;
                    let from = self.u32()?;
                    let len = self.array()?;
                    let mut decisions = Vec::with_capacity(cautious::<EdgeDecision>(len));
                    for _ in 0..len {
                        self.array_of(3)?;
                        decisions.push(EdgeDecision {
                            edge: self.u32()?,
                            taken: self.bool()?,
                            saw: self.value(VALUE_DEPTH_MAX)?,
                        });
                    }
                    Payload::GraphRouted {
                        graph,
                        from,
                        decisions,
                        skipped: self.bool()?,
                    }
                }
                _ => return None,
            })
        }

        fn message(&mut self) -> Option<Message> {
            self.array_of(2)?;
            Some(Message {
                value: self.value(VALUE_DEPTH_MAX)?,
                as_result: self.bool()?,
            })
        }

        fn task_error(&mut self) -> Option<TaskError> {
            self.array_of(2)?;
            Some(TaskError {
                message: self.string()?,
                retryable: self.bool()?,
            })
        }

        fn status(&mut self) -> Option<Status> {
            if let Some(0x80..=0x8f | 0xde | 0xdf) = self.peek() {
                if self.variant()? != "marked_for_deletion" {
                    return None;
                }
                self.fields(1)?;
                return Some(Status::MarkedForDeletion {
                    expires_at: Timestamp(self.i64()?),
                });
            }
            Some(match self.str()? {
                "pending" => Status::Pending,
                "queued" => Status::Queued,
                "running" => Status::Running,
                "suspended" => Status::Suspended,
                "interrupted" => Status::Interrupted,
                "canceled" => Status::Canceled,
                "done" => Status::Done,
                "failed" => Status::Failed,
                "skipped" => Status::Skipped,
                _ => return None,
            })
        }

        fn node_specs(&mut self) -> Option<Vec<NodeSpec>> {
            let len = self.array()?;
            let mut nodes = Vec::with_capacity(cautious::<NodeSpec>(len));
            for _ in 0..len {
                nodes.push(self.node_spec()?);
            }
            Some(nodes)
        }

        fn node_spec(&mut self) -> Option<NodeSpec> {
            // Specs written before `on_cleanup` existed have 7 fields: the serde decoder takes
            // them; from schema 6, a priority other than 0 is a ninth.
            let fields = self.array()?;
            if !(8..=9).contains(&fields) {
                return None;
            }
            Some(NodeSpec {
                name: self.string()?,
                kind: self.kind_spec()?,
                kwargs: self.value(VALUE_DEPTH_MAX)?,
                parent: self.link()?,
                on_success: self.indexes()?,
                on_error: self.indexes()?,
                return_field: self.string()?,
                on_cleanup: self.indexes()?,
                priority: match fields {
                    9 => i32::try_from(self.i64()?).ok()?,
                    _ => 0,
                },
            })
        }

        fn kind_spec(&mut self) -> Option<KindSpec> {
            // A unit variant is its name alone (a fixstr), the others a one-entry map.
            if (0xa0..=0xbf).contains(&self.peek()?) {
                return match self.str()? {
                    "gate" => Some(KindSpec::Gate),
                    _ => None,
                };
            }
            Some(match self.variant()? {
                "task" => {
                    self.fields(2)?;
                    let task = self.string()?;
                    self.array_of(3)?;
                    let retry = RetryPolicy {
                        max_retries: self.u32()?,
                        backoff_ms: self.uint()?,
                        backoff_max_ms: self.uint()?,
                    };
                    KindSpec::Task { task, retry }
                }
                "chain" => {
                    self.fields(1)?;
                    KindSpec::Chain {
                        children: self.indexes()?,
                    }
                }
                "swarm" => {
                    let fields = self.array()?;
                    if !(3..=4).contains(&fields) {
                        return None;
                    }
                    let children = self.indexes()?;
                    self.array_of(2)?;
                    let config = SwarmConfig {
                        max_concurrency: self.u32()?,
                        stop_after_n_failures: match self.peek()? {
                            0xc0 => {
                                self.pos += 1;
                                None
                            }
                            _ => Some(self.u32()?),
                        },
                    };
                    let closed = self.bool()?;
                    let item_callbacks = match fields {
                        4 => {
                            self.array_of(2)?;
                            self.depth += 1;
                            if self.depth > super::EVENT_DEPTH_MAX {
                                return None;
                            }
                            let callbacks = ItemCallbacks {
                                on_success: self.node_specs()?,
                                on_error: self.node_specs()?,
                            };
                            self.depth -= 1;
                            callbacks
                        }
                        _ => ItemCallbacks::default(),
                    };
                    KindSpec::Swarm {
                        children,
                        config,
                        closed,
                        item_callbacks,
                    }
                }
                _ => return None,
            })
        }

        /// `Option<Link>`: nil, or `[node, role]`.
        fn link(&mut self) -> Option<Option<Link>> {
            if self.peek()? == 0xc0 {
                self.pos += 1;
                return Some(None);
            }
            self.array_of(2)?;
            let node = self.u32()?;
            let role = match self.str()? {
                "child" => Role::Child,
                "success_callback" => Role::SuccessCallback,
                "error_callback" => Role::ErrorCallback,
                "cleanup" => Role::Cleanup,
                _ => return None,
            };
            Some(Some(Link { node, role }))
        }

        fn indexes(&mut self) -> Option<Vec<u32>> {
            let len = self.array()?;
            let mut out = Vec::with_capacity(cautious::<u32>(len));
            for _ in 0..len {
                out.push(self.u32()?);
            }
            Some(out)
        }

        /// A JSON value, built exactly as serde_json's own visitor builds it (same `From`
        /// conversions, later duplicate keys replacing earlier ones). `depth` levels of arrays
        /// and maps are allowed.
        fn value(&mut self, depth: usize) -> Option<Value> {
            Some(match self.peek()? {
                0xc0 => {
                    self.pos += 1;
                    Value::Null
                }
                0xc2 | 0xc3 => Value::Bool(self.bool()?),
                0x00..=0x7f | 0xcc..=0xcf => Value::from(self.uint()?),
                0xe0..=0xff | 0xd0..=0xd3 => Value::from(self.i64()?),
                0xcb => Value::from(f64::from_be_bytes(self.after_marker()?)),
                0xa0..=0xbf | 0xd9..=0xdb => Value::String(self.string()?),
                0x90..=0x9f | 0xdc | 0xdd => {
                    let depth = depth.checked_sub(1)?;
                    let len = self.array()?;
                    let mut items = Vec::with_capacity(cautious::<Value>(len));
                    for _ in 0..len {
                        items.push(self.value(depth)?);
                    }
                    Value::Array(items)
                }
                0x80..=0x8f | 0xde | 0xdf => {
                    let depth = depth.checked_sub(1)?;
                    let len = self.map_len()?;
                    let mut map = Map::new();
                    for _ in 0..len {
                        let key = self.string()?;
                        let value = self.value(depth)?;
                        map.insert(key, value);
                    }
                    Value::Object(map)
                }
                _ => return None,
            })
        }

        /// Skip one value of any type, `depth` levels of arrays and maps at most.
        fn skip(&mut self, depth: usize) -> Option<()> {
            let len = match self.byte()? {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
                b @ 0xa0..=0xbf => usize::from(b & 0x1f),
                0xcc | 0xd0 => 1,
                0xcd | 0xd1 | 0xd4 => 2,
                0xd5 => 3,
                0xca | 0xce | 0xd2 => 4,
                0xd6 => 5,
                0xcb | 0xcf | 0xd3 => 8,
                0xd7 => 9,
                0xd8 => 17,
                0xc4 | 0xd9 => self.len8()?,
                0xc5 | 0xda => self.len16()?,
                0xc6 | 0xdb => self.len32()?,
                0xc7 => self.len8()? + 1,
                0xc8 => self.len16()? + 1,
                0xc9 => self.len32()?.checked_add(1)?,
                b @ (0x90..=0x9f | 0xdc | 0xdd | 0x80..=0x8f | 0xde | 0xdf) => {
                    self.pos -= 1;
                    let depth = depth.checked_sub(1)?;
                    let items = if b & 0xf0 == 0x90 || b == 0xdc || b == 0xdd {
                        self.array()?
                    } else {
                        self.map_len()?.checked_mul(2)?
                    };
                    for _ in 0..items {
                        self.skip(depth)?;
                    }
                    0
                }
                _ => return None,
            };
            self.take(len).map(|_| ())
        }
    }
}
