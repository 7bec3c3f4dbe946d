//! The durable queue and the agent's passes, with a stand-in for the copy
//! itself: locks, duplicates, damaged entries, refusals that only the user
//! can fix, and the reconciliation report.

use std::cell::RefCell;
use std::path::Path;

use ferry::agent::{Agent, Busy, Outcome};
use ferry::copy::CopySummary;
use ferry::queue::{Queue, QueueEntry};
use ferry::Error;
use ferry_proto::{Failure, FailureCode, ProtoError};

fn summary() -> CopySummary {
    CopySummary {
        files: 1,
        bytes_total: 1,
        bytes_sent: 1,
        bytes_resumed: 0,
        retries: 0,
        data_lanes: 0,
        files_at_once: 1,
        duration_s: 0.0,
        digest: String::new(),
        alg: "blake3".into(),
        per_file: Vec::new(),
        skipped: 0,
    }
}

/// A queued entry saved in `state`.
fn queued(state: &Path, dst: &str) -> QueueEntry {
    let q = Queue::new(state);
    let mut e = q.entry_for(&["/src/a".to_string()], dst, false, "blake3");
    e.state = ferry::queue::QueueState::Queued;
    q.put(&e).unwrap();
    e
}

fn unauthorized() -> Error {
    Error::Proto(ProtoError::Remote(Failure::new(
        FailureCode::Unauthorized,
        "authentication failed: wrong or missing token",
    )))
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_duplicated_entry_is_delivered_once_and_every_copy_of_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let e = queued(dir.path(), "ferry://h/x");
    let qdir = dir.path().join("queue");
    std::fs::copy(
        qdir.join(format!("{}.json", e.id)),
        qdir.join("copy of it.json"),
    )
    .unwrap();
    let q = Queue::new(dir.path());
    assert_eq!(q.list().len(), 1, "two files with one id are one entry");

    let mut agent = Agent::start(dir.path()).unwrap().unwrap();
    let runs = RefCell::new(Vec::new());
    for _ in 0..3 {
        agent
            .pass(
                |e| {
                    runs.borrow_mut().push(e.id.clone());
                    async { Ok(summary()) }
                },
                |_| {},
            )
            .await;
    }
    assert_eq!(*runs.borrow(), vec![e.id.clone()]);
    assert!(names(&qdir).is_empty(), "{:?}", names(&qdir));
    let report = agent.report();
    assert!(report.nothing_missing(), "{:?}", report.lines(0));
    assert_eq!(report.completed.len(), 1);
}

#[tokio::test]
async fn damaged_entries_are_reported_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let good = queued(dir.path(), "ferry://h/x");
    let qdir = dir.path().join("queue");
    let body = std::fs::read(qdir.join(format!("{}.json", good.id))).unwrap();
    std::fs::write(qdir.join("truncated.json"), &body[..body.len() / 2]).unwrap();
    std::fs::write(qdir.join("garbage.json"), b"\x00\x01 not json").unwrap();
    std::fs::write(qdir.join("empty.json"), b"").unwrap();
    let mut bad_id = good.clone();
    bad_id.id = "../../etc".into();
    std::fs::write(
        qdir.join("escape.json"),
        serde_json::to_vec(&bad_id).unwrap(),
    )
    .unwrap();

    let scan = Queue::new(dir.path()).scan();
    assert_eq!(scan.entries.len(), 1);
    let problems: Vec<(String, String)> = scan
        .damaged
        .iter()
        .map(|d| {
            (
                d.path.file_name().unwrap().to_string_lossy().into_owned(),
                d.problem.clone(),
            )
        })
        .collect();
    assert_eq!(problems.len(), 4, "{problems:?}");
    for (name, want) in [
        ("empty.json", "empty"),
        ("escape.json", "not a queue entry id"),
        ("garbage.json", "not a queue entry"),
        ("truncated.json", "truncated"),
    ] {
        assert!(
            problems.iter().any(|(n, p)| n == name && p.contains(want)),
            "{name}: {problems:?}"
        );
    }

    let mut agent = Agent::start(dir.path()).unwrap().unwrap();
    agent.pass(|_| async { Ok(summary()) }, |_| {}).await;
    let report = agent.report();
    assert!(!report.nothing_missing());
    assert!(report.needs_user());
    let lines = report.lines(0).join("\n");
    assert!(!lines.contains("nothing missing"), "{lines}");
    for name in [
        "truncated.json",
        "garbage.json",
        "empty.json",
        "escape.json",
    ] {
        assert!(lines.contains(name), "{name} not reported: {lines}");
    }
    // Still on disk, where the user can look at them.
    assert_eq!(
        names(&qdir),
        [
            "empty.json",
            "escape.json",
            "garbage.json",
            "truncated.json"
        ]
    );
}

#[tokio::test]
async fn a_refused_token_keeps_the_entry_queued_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let e = queued(dir.path(), "ferry://h/x");
    let mut agent = Agent::start(dir.path()).unwrap().unwrap();
    let runs = RefCell::new(0);
    for _ in 0..2 {
        agent
            .pass(
                |_| {
                    *runs.borrow_mut() += 1;
                    async {
                        Err(Error::RetriesExhausted {
                            attempts: 1,
                            last: Box::new(unauthorized()),
                        })
                    }
                },
                |_| {},
            )
            .await;
    }
    // Tried on the first pass, then left to its backoff.
    assert_eq!(*runs.borrow(), 1);
    let q = Queue::new(dir.path());
    let kept = q.get(&e.id).expect("the entry must stay queued");
    assert_eq!(kept.state, ferry::queue::QueueState::Queued);
    assert_eq!(kept.attempts, 1);
    let why = kept.last_error.unwrap();
    assert!(
        why.contains("server refused our token: set FERRY_TOKEN or --token-file"),
        "{why}"
    );
    assert!(kept.next_attempt_unix > ferry::queue::now_unix());
    let report = agent.report();
    assert!(!report.nothing_missing());
    let lines = report.lines(0).join("\n");
    assert!(
        lines.contains(&e.id) && lines.contains("server refused our token"),
        "{lines}"
    );
}

#[tokio::test]
async fn a_failure_of_a_queued_entry_never_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = queued(dir.path(), "ferry://h/x");
    let q = Queue::new(dir.path());
    for err in [
        Error::NotFound("no such source".into()),
        Error::Usage("bad".into()),
        unauthorized(),
    ] {
        let entry = q.get(&e.id).unwrap();
        let out = ferry::agent::run_entry(&q, entry, ferry::agent::Origin::Queued, |_| async {
            Err(err)
        })
        .await
        .unwrap();
        assert!(matches!(out, Outcome::Queued { .. }), "{out:?}");
        assert!(q.get(&e.id).is_some());
    }
}

#[test]
fn a_stale_running_pid_does_not_make_an_entry_busy() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = queued(dir.path(), "ferry://h/x");
    // An entry left "running" by a process that died, whose pid now
    // belongs to a live process (pid 1 always exists).
    e.state = ferry::queue::QueueState::Running;
    e.pid = 1;
    let q = Queue::new(dir.path());
    q.put(&e).unwrap();
    assert!(!q.is_running_elsewhere(&e.id));
    let claim = q.claim(&e.id).unwrap().expect("nobody holds it");
    // Held now: seen from any other handle, in this process or another.
    assert!(q.is_running_elsewhere(&e.id));
    assert_eq!(q.running_elsewhere(&e.id), Some(std::process::id()));
    assert!(Queue::new(dir.path()).claim(&e.id).unwrap().is_none());
    drop(claim);
    assert!(!q.is_running_elsewhere(&e.id));
}

#[tokio::test]
async fn an_entry_being_run_is_not_run_again_and_one_completed_meanwhile_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let e = queued(dir.path(), "ferry://h/x");
    let q = Queue::new(dir.path());
    let claim = q.claim(&e.id).unwrap().unwrap();
    let out = ferry::agent::run_entry(&q, e.clone(), ferry::agent::Origin::Queued, |_| async {
        panic!("must not run")
    })
    .await
    .unwrap();
    match out {
        Outcome::Busy(Busy::Entry { id, pid }) => {
            assert_eq!(id, e.id);
            assert_eq!(pid, std::process::id());
        }
        other => panic!("{other:?}"),
    }
    // The holder completes it: a run that read the entry before must not repeat it.
    q.remove(&e.id).unwrap();
    drop(claim);
    let out = ferry::agent::run_entry(&q, e, ferry::agent::Origin::Queued, |_| async {
        panic!("must not run")
    })
    .await
    .unwrap();
    assert!(matches!(out, Outcome::Gone), "{out:?}");
}

#[test]
fn one_agent_per_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let first = Agent::start(dir.path()).unwrap().unwrap();
    match Agent::start(dir.path()).unwrap() {
        Err(busy @ Busy::Agent { pid, .. }) => {
            assert_eq!(pid, std::process::id());
            let msg = busy.to_string();
            assert!(
                msg.contains(&format!("another ferry agent (pid {pid}) is draining")),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    drop(first);
    assert!(Agent::start(dir.path()).unwrap().is_ok());
}

#[tokio::test]
async fn a_new_copy_that_cannot_work_is_reported_not_queued_and_one_that_may_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::new(dir.path());
    let fresh = q.entry_for(&["/src/a".to_string()], "ferry://h/x", false, "blake3");
    let out = ferry::agent::run_entry(&q, fresh, ferry::agent::Origin::NewCopy, |_| async {
        Err(unauthorized())
    })
    .await
    .unwrap();
    assert!(matches!(out, Outcome::Failed(_)), "{out:?}");
    assert!(q.list().is_empty());
    let fresh = q.entry_for(&["/src/a".to_string()], "ferry://h/x", false, "blake3");
    let out = ferry::agent::run_entry(
        &q,
        fresh.clone(),
        ferry::agent::Origin::NewCopy,
        |_| async { Err(Error::Timeout("no answer".into())) },
    )
    .await
    .unwrap();
    assert!(matches!(out, Outcome::Queued { .. }), "{out:?}");
    assert_eq!(
        q.get(&fresh.id).unwrap().state,
        ferry::queue::QueueState::Queued
    );
}
