//! Damaged storage is reported, never folded in, skipped or panicked on. First the log's own
//! records are altered through raw sled (key layout at the top of `src/sled_log.rs`); then sled's
//! files themselves are garbled, where the only promise is "an error or success, never a panic".

use crate::{event_with, open_sled, runtime, stream};
use mageflow_core::WorkflowId;
use mageflow_store::{AppendRequest, Error, EventLog, SledLog, SledOptions};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn event_key(pos: u64) -> Vec<u8> {
    let mut k = vec![b'e'];
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

fn stream_key(s: WorkflowId, last_seq: u64) -> Vec<u8> {
    let mut k = vec![b's'];
    k.extend_from_slice(s.as_bytes());
    k.extend_from_slice(&last_seq.to_be_bytes());
    k
}

const A: u128 = 1;
const B: u128 = 2;
const C: u128 = 3;

/// Write a small log and close it. Positions: A1-2 B1 A3 C1-3 B2-3 A4 C4 B4 (12 events), so
/// position 5 is C seq 1, the first event of a three-event append.
fn build(dir: &Path) {
    let rt = runtime();
    let log = open_sled(dir);
    for (s, version, count) in [
        (A, 0, 2),
        (B, 0, 1),
        (A, 2, 1),
        (C, 0, 3),
        (B, 1, 2),
        (A, 3, 1),
        (C, 3, 1),
        (B, 3, 1),
    ] {
        let s = stream(s);
        let req = AppendRequest {
            stream: s,
            expected_version: version,
            events: (version + 1..=version + count)
                .map(|seq| event_with(s, seq, "c", 40))
                .collect(),
        };
        rt.block_on(log.append(vec![req])).expect("append");
    }
    assert_eq!(log.verify().expect("verify"), 12);
}

/// Change the closed log's tree with raw sled.
fn with_raw(dir: &Path, f: impl FnOnce(&sled::Tree)) {
    let db = sled::open(dir).expect("raw sled open");
    let tree = db.open_tree("log").expect("tree");
    f(&tree);
    db.flush().expect("raw sled flush");
}

fn expect_corrupt<T: std::fmt::Debug>(what: &str, r: Result<T, Error>, needle: &str) {
    match r {
        Err(Error::Corrupt(msg)) => assert!(
            msg.contains(needle),
            "{what}: the corruption report should name {needle:?}: {msg}"
        ),
        other => panic!("{what}: expected Error::Corrupt naming {needle:?}, got {other:?}"),
    }
}

/// Damage position 5 (stream C seq 1) with `damage`, then check every reader reports it.
fn damaged_event(damage: impl FnOnce(&sled::Tree), needle: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    with_raw(dir.path(), damage);
    let log = open_sled(dir.path());
    assert_eq!(log.head(), 12);
    expect_corrupt("read_all", log.read_all(1, 100), needle);
    expect_corrupt("read_all from 5", log.read_all(5, 1), needle);
    expect_corrupt("read_stream", log.read_stream(stream(C), 1), needle);
    expect_corrupt("verify", log.verify(), needle);
    // Reads that do not touch the damage still work.
    assert_eq!(log.read_all(1, 4).expect("read_all before").len(), 4);
    assert_eq!(log.read_all(6, 100).expect("read_all after").len(), 7);
    assert_eq!(log.read_stream(stream(A), 1).expect("stream A").len(), 4);
    assert_eq!(
        log.read_stream(stream(C), 2).expect("C from seq 2").len(),
        3
    );
}

#[test]
fn an_altered_byte_is_reported() {
    damaged_event(
        |tree| {
            let mut v = tree
                .get(event_key(5))
                .expect("get")
                .expect("event 5")
                .to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0x01;
            tree.insert(event_key(5), v).expect("insert");
        },
        "position 5",
    );
}

#[test]
fn an_altered_checksum_is_reported() {
    damaged_event(
        |tree| {
            let mut v = tree
                .get(event_key(5))
                .expect("get")
                .expect("event 5")
                .to_vec();
            v[0] ^= 0x80;
            tree.insert(event_key(5), v).expect("insert");
        },
        "position 5",
    );
}

#[test]
fn a_truncated_frame_is_reported() {
    damaged_event(
        |tree| {
            let v = tree.get(event_key(5)).expect("get").expect("event 5");
            tree.insert(event_key(5), &v[..2]).expect("insert");
        },
        "position 5",
    );
}

#[test]
fn a_missing_event_is_reported() {
    damaged_event(
        |tree| {
            tree.remove(event_key(5)).expect("remove").expect("event 5");
        },
        "position 5",
    );
}

#[test]
fn a_misplaced_event_is_reported() {
    // Position 5 holds a well-formed event with a good checksum, but the wrong one (A seq 3, a
    // copy of position 4): only the stream index can tell.
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    with_raw(dir.path(), |tree| {
        let v = tree.get(event_key(4)).expect("get").expect("event 4");
        tree.insert(event_key(5), v).expect("insert");
    });
    let log = open_sled(dir.path());
    expect_corrupt("read_stream", log.read_stream(stream(C), 1), "position 5");
    expect_corrupt("verify", log.verify(), "position 5");
}

#[test]
fn a_damaged_last_event_fails_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    with_raw(dir.path(), |tree| {
        let v = tree.get(event_key(12)).expect("get").expect("event 12");
        tree.insert(event_key(12), &v[..v.len() - 1])
            .expect("insert");
    });
    let opened = SledLog::open(dir.path(), SledOptions::default());
    expect_corrupt("open", opened.map(|_| ()), "position 12");
}

#[test]
fn a_lost_last_event_is_reported_by_verify() {
    // The last event (B seq 4) is gone but its index entry is not.
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    with_raw(dir.path(), |tree| {
        tree.remove(event_key(12))
            .expect("remove")
            .expect("event 12");
    });
    let log = open_sled(dir.path());
    expect_corrupt("verify", log.verify(), "position 12");
}

/// Replace the stream index entry of C ending at `last_seq` by a 15-byte value.
fn bad_index_entry(last_seq: u64) -> (tempfile::TempDir, SledLog) {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    with_raw(dir.path(), |tree| {
        let key = stream_key(stream(C), last_seq);
        let v = tree.get(&key).expect("get").expect("index entry");
        assert_eq!(v.len(), 16);
        tree.insert(key, &v[..15]).expect("insert");
    });
    let log = open_sled(dir.path());
    (dir, log)
}

#[test]
fn an_index_entry_of_the_wrong_size_is_reported() {
    let c = stream(C).to_string();
    let (_dir, log) = bad_index_entry(3);
    // The events themselves are intact: read_all does not use the index.
    assert_eq!(log.read_all(1, 100).expect("read_all").len(), 12);
    expect_corrupt("read_stream", log.read_stream(stream(C), 1), &c);
    expect_corrupt("read_stream", log.read_stream(stream(C), 1), "seq 3");
    expect_corrupt("verify", log.verify(), &c);
    assert_eq!(log.stream_version(stream(C)).expect("version"), 4);

    // The newest index entry of a stream is what its version comes from.
    let (_dir, log) = bad_index_entry(4);
    expect_corrupt("read_stream", log.read_stream(stream(C), 1), "seq 4");
    expect_corrupt("stream_version", log.stream_version(stream(C)), &c);
    expect_corrupt("verify", log.verify(), &c);
}

#[test]
fn a_missing_index_entry_is_reported() {
    // C's middle index entry (seqs 1..=3) is gone: C seq 4 remains, after a gap.
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    with_raw(dir.path(), |tree| {
        tree.remove(stream_key(stream(C), 3))
            .expect("remove")
            .expect("index entry");
    });
    let log = open_sled(dir.path());
    expect_corrupt(
        "read_stream",
        log.read_stream(stream(C), 1),
        &stream(C).to_string(),
    );
    expect_corrupt("verify", log.verify(), &stream(C).to_string());
}

#[test]
fn an_index_entry_pointing_nowhere_is_reported() {
    // C's first index entry (seqs 1..=3) points at position u64::MAX: no overflow, no panic, and
    // no silently shortened stream, since C's next entry is committed.
    let c = stream(C).to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    with_raw(dir.path(), |tree| {
        let key = stream_key(stream(C), 3);
        let v = tree.get(&key).expect("get").expect("index entry");
        let mut bad = u64::MAX.to_be_bytes().to_vec();
        bad.extend_from_slice(&v[8..]);
        tree.insert(key, bad).expect("insert");
    });
    let log = open_sled(dir.path());
    expect_corrupt("read_stream from 1", log.read_stream(stream(C), 1), &c);
    expect_corrupt("read_stream from 2", log.read_stream(stream(C), 2), &c);
    expect_corrupt("verify", log.verify(), &c);
    assert_eq!(log.read_stream(stream(C), 4).expect("C seq 4").len(), 1);
}

#[test]
fn events_without_an_index_entry_are_reported_by_verify() {
    // B's last index entry is gone: B seq 4 (position 12) is in the log but unreachable by stream.
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    with_raw(dir.path(), |tree| {
        tree.remove(stream_key(stream(B), 4))
            .expect("remove")
            .expect("index entry");
    });
    let log = open_sled(dir.path());
    expect_corrupt("verify", log.verify(), &stream(B).to_string());
}

// --- Garbled sled files -------------------------------------------------------------------------

/// What opening and checking a damaged directory gave.
#[derive(Debug)]
enum Outcome {
    /// Opened and verified with this many events (possibly fewer than written: sled may treat
    /// damage at its log's tail as a torn write and cut there).
    Verified(u64),
    Refused(String),
    Panicked(String),
}

fn open_and_check(dir: &Path) -> Outcome {
    let run = catch_unwind(AssertUnwindSafe(|| -> Result<u64, Error> {
        let log = SledLog::open(dir, SledOptions::default())?;
        let count = log.verify()?;
        let all = log.read_all(1, usize::MAX)?;
        assert_eq!(all.len() as u64, count, "read_all after a good verify");
        Ok(count)
    }));
    match run {
        Ok(Ok(n)) => Outcome::Verified(n),
        Ok(Err(e)) => Outcome::Refused(e.to_string()),
        Err(p) => Outcome::Panicked(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "non-string panic".into()),
        ),
    }
}

const TEMPLATE_EVENTS: u64 = 600;

fn build_template(dir: &Path) {
    let rt = runtime();
    let log = open_sled(dir);
    for i in 0..TEMPLATE_EVENTS / 3 {
        let s = stream(u128::from(i % 7));
        let v = log.stream_version(s).expect("version");
        let req = AppendRequest {
            stream: s,
            expected_version: v,
            events: (v + 1..=v + 3)
                .map(|q| event_with(s, q, "g", 150))
                .collect(),
        };
        rt.block_on(log.append(vec![req])).expect("append");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// Files of a sled directory, relative paths, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("prefix");
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Overwrite `len` bytes at `at_permille` of the file with `byte`.
    Overwrite {
        at_permille: u64,
        len: usize,
        byte: u8,
    },
    /// Overwrite with pseudo-random bytes.
    Noise {
        at_permille: u64,
        len: usize,
        seed: u64,
    },
    /// Invert one byte.
    Flip {
        at_permille: u64,
    },
    /// Cut the file to this fraction.
    Truncate {
        keep_permille: u64,
    },
    Delete,
}

fn apply_damage(path: &Path, damage: Damage) {
    let mut bytes = std::fs::read(path).expect("read");
    let at = |permille: u64| (bytes.len() as u64 * permille / 1000) as usize;
    match damage {
        Damage::Overwrite {
            at_permille,
            len,
            byte,
        } => {
            let start = at(at_permille);
            let end = (start + len).min(bytes.len());
            bytes[start..end].fill(byte);
        }
        Damage::Noise {
            at_permille,
            len,
            seed,
        } => {
            let start = at(at_permille);
            let end = (start + len).min(bytes.len());
            let mut x = seed | 1;
            for b in &mut bytes[start..end] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        Damage::Flip { at_permille } => {
            let i = at(at_permille).min(bytes.len().saturating_sub(1));
            if let Some(b) = bytes.get_mut(i) {
                *b = !*b;
            }
        }
        Damage::Truncate { keep_permille } => {
            let keep = at(keep_permille);
            bytes.truncate(keep);
        }
        Damage::Delete => {
            std::fs::remove_file(path).expect("remove");
            return;
        }
    }
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn garbled_sled_files_never_panic() {
    let template = tempfile::tempdir().expect("tempdir");
    build_template(template.path());
    let names = files(template.path());
    assert!(
        names.iter().any(|n| n == "db"),
        "sled layout changed: {names:?}"
    );

    let mut damages = Vec::new();
    for at_permille in [0, 5, 100, 250, 500, 750, 900, 990] {
        for (len, byte) in [(1, 0xff), (64, 0x00), (4096, 0xff)] {
            damages.push(Damage::Overwrite {
                at_permille,
                len,
                byte,
            });
        }
        damages.push(Damage::Noise {
            at_permille,
            len: 512,
            seed: at_permille + 7,
        });
    }
    // Single flipped bytes all over the file.
    for i in 0..24u64 {
        damages.push(Damage::Flip {
            at_permille: (i * 397 + 13) % 1000,
        });
    }
    for keep_permille in [0, 10, 500, 999] {
        damages.push(Damage::Truncate { keep_permille });
    }
    damages.push(Damage::Delete);

    let mut report = Vec::new();
    let mut panics = Vec::new();
    for name in &names {
        for &damage in &damages {
            let case = tempfile::tempdir().expect("tempdir");
            copy_dir(template.path(), case.path());
            let path = case.path().join(name);
            if std::fs::metadata(&path).expect("metadata").len() == 0
                && !matches!(damage, Damage::Delete)
            {
                continue;
            }
            apply_damage(&path, damage);
            let outcome = open_and_check(case.path());
            if let Outcome::Panicked(msg) = &outcome {
                panics.push(format!("{name} {damage:?}: {msg}"));
            }
            report.push((format!("{name} {damage:?}"), outcome));
        }
    }
    let (mut whole, mut short, mut refused) = (0, 0, 0);
    for (_, outcome) in &report {
        match outcome {
            Outcome::Verified(n) if *n == TEMPLATE_EVENTS => whole += 1,
            Outcome::Verified(_) => short += 1,
            Outcome::Refused(msg) => refused += usize::from(!msg.is_empty()),
            Outcome::Panicked(_) => {}
        }
    }
    // Shown with --nocapture: how sled copes, for the record.
    println!(
        "garbled sled files: {} cases: {whole} verified intact, {short} verified with fewer \
         events (cut at the damage), {refused} refused, {} panicked",
        report.len(),
        panics.len()
    );
    if std::env::var_os("MAGEFLOW_CORRUPTION_REPORT").is_some() {
        for (case, outcome) in &report {
            println!("{case} -> {outcome:?}");
        }
    }
    assert!(
        panics.is_empty(),
        "opening or verifying a garbled sled directory panicked in {} of {} cases \
         (sled or the log must return an error instead):\n{}",
        panics.len(),
        report.len(),
        panics.join("\n")
    );
}
