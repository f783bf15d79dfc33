//! A real crash test: this test binary re-executes itself as a child that appends to a
//! [`SledLog`] under load and reports every acknowledged append on stdout; the parent kills it
//! with SIGKILL at a random moment, reopens the log and proves that nothing acknowledged was lost,
//! nothing was duplicated or reordered, and every stored event is exactly what was written.
//! Twenty-odd rounds run against the same directory, so recovery after recovery is exercised.

use crate::{open_sled, runtime, stream};
use mageflow_core::{Actor, Event, Payload, Timestamp, WorkflowId, SCHEMA_VERSION};
use mageflow_store::{AppendRequest, EventLog, SledLog};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_DIR_ENV: &str = "MAGEFLOW_CRASH_CHILD_DIR";
const CHILD_SEED_ENV: &str = "MAGEFLOW_CRASH_CHILD_SEED";
/// Set: the child also compacts streams while it appends.
const CHILD_COMPACT_ENV: &str = "MAGEFLOW_CRASH_CHILD_COMPACT";
const ROUNDS: u64 = 24;
const APPENDERS: u64 = 8;
/// Streams each appender owns (no contention on them).
const OWN_STREAMS: u64 = 4;
/// One stream every appender writes to now and then, retrying on conflict.
const SHARED_STREAM: u128 = 999;
const BATCH_EVENTS_MAX: u64 = 20;

fn own_stream(appender: u64, n: u64) -> WorkflowId {
    stream(1000 + u128::from(appender * OWN_STREAMS + n))
}

fn all_streams() -> Vec<WorkflowId> {
    let mut out: Vec<WorkflowId> = (0..APPENDERS)
        .flat_map(|a| (0..OWN_STREAMS).map(move |n| own_stream(a, n)))
        .collect();
    out.push(stream(SHARED_STREAM));
    out
}

/// The event the child writes as `seq` of `stream`: a function of both, so the parent can check
/// every stored byte. About 200 bytes of kwargs.
fn crash_event(stream: WorkflowId, seq: u64) -> Event {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from_be_bytes(stream.as_bytes()[8..].try_into().expect("8 bytes"));
    let pad: String = (0..160)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    Event {
        stream,
        seq,
        at: Timestamp::from_micros(1_700_000_000_000_000 + seq as i64 * 1000),
        actor: Actor::worker("crash-child"),
        schema: SCHEMA_VERSION,
        payload: Payload::KwargsUpdated {
            node: (seq % 7) as u32,
            kwargs: json!({ "seq": seq, "stream": stream.to_string(), "pad": pad }),
        },
    }
}

fn append_request(stream: WorkflowId, version: u64, count: u64) -> AppendRequest {
    AppendRequest {
        stream,
        expected_version: version,
        events: (version + 1..=version + count)
            .map(|seq| crash_event(stream, seq))
            .collect(),
    }
}

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn ack(stream: WorkflowId, last_seq: u64) {
    let mut out = std::io::stdout().lock();
    // A failed write means the parent is gone; the kill follows anyway.
    let _ = writeln!(out, "ack {stream} {last_seq}");
    let _ = out.flush();
}

/// One appender of the child: forever, pick one or two of its own streams (or the shared one)
/// and append a random batch, printing an ack for every request once the append resolves.
async fn appender(log: Arc<SledLog>, id: u64, seed: u64) {
    let mut rng = Lcg(seed ^ (id + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut versions = BTreeMap::new();
    for n in 0..OWN_STREAMS {
        let s = own_stream(id, n);
        versions.insert(s, log.stream_version(s).expect("version"));
    }
    loop {
        if rng.below(8) == 0 {
            let s = stream(SHARED_STREAM);
            let count = 1 + rng.below(BATCH_EVENTS_MAX);
            loop {
                let v = log.stream_version(s).expect("version");
                match log.append(vec![append_request(s, v, count)]).await {
                    Ok(_) => {
                        ack(s, v + count);
                        break;
                    }
                    Err(e) if e.is_conflict() => tokio::task::yield_now().await,
                    Err(e) => panic!("append: {e}"),
                }
            }
            continue;
        }
        let first = own_stream(id, rng.below(OWN_STREAMS));
        let mut targets = vec![first];
        if rng.below(4) == 0 {
            let second = own_stream(id, rng.below(OWN_STREAMS));
            if second != first {
                targets.push(second);
            }
        }
        let requests: Vec<AppendRequest> = targets
            .iter()
            .map(|s| append_request(*s, versions[s], 1 + rng.below(BATCH_EVENTS_MAX)))
            .collect();
        let acks: Vec<(WorkflowId, u64)> = requests
            .iter()
            .map(|r| (r.stream, r.expected_version + r.events.len() as u64))
            .collect();
        log.append(requests).await.expect("append to own streams");
        for (s, last) in acks {
            versions.insert(s, last);
            ack(s, last);
        }
    }
}

/// The child's compactor: forever, compact a random stream up to its version or a little
/// below (a partial compaction), with a snapshot that names what it covers.
async fn compactor(log: Arc<SledLog>, seed: u64) {
    let mut rng = Lcg(seed ^ 0x5bd1_e995);
    let streams = all_streams();
    loop {
        let s = streams[rng.below(streams.len() as u64) as usize];
        let v = log.stream_version(s).expect("version");
        let up_to = v.saturating_sub(rng.below(3));
        let l = log.clone();
        let snapshot = format!("{s} up to {up_to}").into_bytes();
        tokio::task::spawn_blocking(move || l.compact(s, Some(up_to), Some(snapshot)))
            .await
            .expect("compaction thread")
            .expect("compact");
    }
}

/// The child half: does nothing in an ordinary test run.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let seed: u64 = std::env::var(CHILD_SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rt = runtime();
    let log = Arc::new(open_sled(std::path::Path::new(&dir)));
    {
        // libtest may have left "test crash::crash_child ... " unterminated on stdout.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "\nready {}", log.head());
        let _ = out.flush();
    }
    rt.block_on(async {
        let mut tasks: Vec<_> = (0..APPENDERS)
            .map(|id| tokio::spawn(appender(log.clone(), id, seed)))
            .collect();
        if std::env::var_os(CHILD_COMPACT_ENV).is_some() {
            tasks.push(tokio::spawn(compactor(log.clone(), seed)));
        }
        for t in tasks {
            t.await.expect("appender");
        }
    });
}

/// Parse an `ack <stream> <last_seq>` line.
fn parse_ack(line: &str) -> Option<(WorkflowId, u64)> {
    let rest = line.trim().strip_prefix("ack ")?;
    let (s, seq) = rest.split_once(' ')?;
    Some((s.parse().ok()?, seq.parse().ok()?))
}

struct Round {
    acks: Vec<(WorkflowId, u64)>,
    /// The child had opened the log before it was killed (otherwise it died during recovery).
    ready: bool,
}

/// Run the child on `dir`, SIGKILL it `delay` after spawning it, return what it acknowledged.
fn run_child(dir: &std::path::Path, seed: u64, delay: Duration, compact: bool) -> Round {
    let exe = std::env::current_exe().expect("current_exe");
    let mut command = Command::new(exe);
    if compact {
        command.env(CHILD_COMPACT_ENV, "1");
    }
    let mut child = command
        .args([
            "crash::crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the crash child");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut round = Round {
            acks: Vec::new(),
            ready: false,
        };
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim().starts_with("ready") {
                round.ready = true;
            } else if let Some(a) = parse_ack(&line) {
                round.acks.push(a);
            }
        }
        round
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // The point of the test: let the child run for a random moment, then kill it mid-work.
    std::thread::sleep(delay);
    let early_exit = child.try_wait().expect("try_wait");
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    let round = reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    assert!(
        early_exit.is_none(),
        "the crash child exited on its own ({early_exit:?}); stderr:\n{stderr}"
    );
    round
}

/// Check the reopened log: `verify`, then every event at or after `from` (older ones were
/// checked in earlier rounds) is dense, in order and exactly what was written, and every
/// acknowledged append is there. `versions` holds each stream's version at position `from - 1`
/// and is advanced to the head.
fn check_log(
    log: &SledLog,
    acked: &BTreeMap<WorkflowId, u64>,
    versions: &mut BTreeMap<WorkflowId, u64>,
    from: u64,
    round: u64,
) {
    let count = log
        .verify()
        .unwrap_or_else(|e| panic!("round {round}: verify after the crash: {e}"));
    assert_eq!(count, log.head(), "round {round}: verify count vs head");
    assert!(
        log.head() + 1 >= from,
        "round {round}: the log went back from {} to {} events after a restart",
        from - 1,
        log.head()
    );
    let before = versions.clone();
    let mut next = from;
    loop {
        let chunk = log
            .read_all(next, 4096)
            .unwrap_or_else(|e| panic!("round {round}: read_all from {next}: {e}"));
        if chunk.is_empty() {
            break;
        }
        for r in chunk {
            assert_eq!(r.position, next, "round {round}: positions are dense");
            next += 1;
            let v = versions.entry(r.event.stream).or_default();
            assert_eq!(
                r.event.seq,
                *v + 1,
                "round {round}: position {} holds {} seq {} after seq {v}: a gap, duplicate or reorder",
                r.position,
                r.event.stream,
                r.event.seq
            );
            *v += 1;
            assert_eq!(
                r.event,
                crash_event(r.event.stream, r.event.seq),
                "round {round}: position {} does not hold what was written",
                r.position
            );
        }
    }
    assert_eq!(
        next - 1,
        log.head(),
        "round {round}: read_all reaches the head"
    );
    let known = all_streams();
    for s in versions.keys() {
        assert!(known.contains(s), "round {round}: unknown stream {s}");
    }
    for s in &known {
        let v = versions.get(s).copied().unwrap_or(0);
        assert_eq!(
            log.stream_version(*s).expect("version"),
            v,
            "round {round}: {s}"
        );
        // The index agrees with the events: the new tail of each stream, read by stream.
        let old = before.get(s).copied().unwrap_or(0);
        let tail = log
            .read_stream(*s, old + 1)
            .unwrap_or_else(|e| panic!("round {round}: read_stream {s}: {e}"));
        assert_eq!(
            tail.len() as u64,
            v - old,
            "round {round}: read_stream {s} length"
        );
        for (i, e) in tail.iter().enumerate() {
            assert_eq!(
                *e,
                crash_event(*s, old + 1 + i as u64),
                "round {round}: {s}"
            );
        }
        let acked_v = acked.get(s).copied().unwrap_or(0);
        assert!(
            v >= acked_v,
            "round {round}: {s} has {v} events but seq {acked_v} was acknowledged: lost"
        );
    }
}

#[test]
fn killed_appender_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    let mut rng = Lcg(0x00c0_ffee);
    let mut acked: BTreeMap<WorkflowId, u64> = BTreeMap::new();
    let mut versions = BTreeMap::new();
    let (mut total_acks, mut killed_in_recovery) = (0, 0);
    let mut checked_to = 0;
    for round in 0..ROUNDS {
        let delay = Duration::from_millis(50 + rng.below(351));
        let seed = rng.next();
        let Round { acks, ready } = run_child(dir.path(), seed, delay, false);
        killed_in_recovery += usize::from(!ready);
        total_acks += acks.len();
        for (s, last) in acks {
            let e = acked.entry(s).or_default();
            *e = (*e).max(last);
        }
        let log = open_sled(dir.path());
        check_log(&log, &acked, &mut versions, checked_to + 1, round);
        checked_to = log.head();
    }
    // Last, everything once more from the first event.
    let log = open_sled(dir.path());
    let mut all = BTreeMap::new();
    check_log(&log, &acked, &mut all, 1, ROUNDS);
    assert_eq!(all, versions);
    assert!(
        total_acks >= ROUNDS as usize,
        "the children acknowledged only {total_acks} appends in {ROUNDS} rounds"
    );
    println!(
        "crash test: {ROUNDS} kills ({killed_in_recovery} before the log was open), {total_acks} \
         acknowledged appends, {} events in the log, {:?}",
        log.head(),
        start.elapsed()
    );
}

/// The same kills with a compactor running beside the appenders: every compaction is one
/// atomic step, so after each crash the log verifies (archives included), every stream reads
/// back whole and exactly as written through `read_stream`, archived or not, and nothing
/// acknowledged is lost.
#[test]
fn killed_compactor_loses_nothing_acknowledged() {
    const COMPACT_ROUNDS: u64 = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Lcg(0x0c0a_c7ed);
    let mut acked: BTreeMap<WorkflowId, u64> = BTreeMap::new();
    let mut archived_total = 0;
    for round in 0..COMPACT_ROUNDS {
        let delay = Duration::from_millis(100 + rng.below(400));
        let Round { acks, .. } = run_child(dir.path(), rng.next(), delay, true);
        for (s, last) in acks {
            let e = acked.entry(s).or_default();
            *e = (*e).max(last);
        }
        let log = open_sled(dir.path());
        let count = log
            .verify()
            .unwrap_or_else(|e| panic!("round {round}: verify after the crash: {e}"));
        assert_eq!(count, log.head(), "round {round}");
        archived_total = 0;
        for s in all_streams() {
            let v = log.stream_version(s).expect("version");
            let events = log
                .read_stream(s, 1)
                .unwrap_or_else(|e| panic!("round {round}: read_stream {s}: {e}"));
            assert_eq!(events.len() as u64, v, "round {round}: {s}");
            for (i, e) in events.iter().enumerate() {
                assert_eq!(*e, crash_event(s, 1 + i as u64), "round {round}: {s}");
            }
            let acked_v = acked.get(&s).copied().unwrap_or(0);
            assert!(v >= acked_v, "round {round}: {s} lost acknowledged events");
            if let Some(a) = log.archived(s).expect("archived") {
                assert!(a.events <= v, "round {round}: {s}");
                archived_total += a.events;
                let snapshot = log.snapshot(s).expect("snapshot").expect("a snapshot");
                let snapshot = String::from_utf8(snapshot).expect("utf-8");
                assert!(snapshot.starts_with(&format!("{s} up to ")), "{snapshot}");
            }
        }
    }
    assert!(archived_total > 0, "the compactor archived nothing");
}
