//! Version and capability negotiation.
//!
//! The client's `Hello` lists every version it speaks and its capabilities;
//! the server picks the highest version whose major it shares and answers
//! `Welcome` with the capabilities both have. An unknown major is refused with
//! a `Failure { code: VersionRefused }`; unknown capabilities are ignored.

use std::time::Duration;

use bytes::Bytes;

use crate::failure::{Failure, FailureCode};
use crate::hash::HashAlg;
use crate::message::{Message, Version};

/// The protocol versions this build speaks, newest first.
pub const SUPPORTED_VERSIONS: &[Version] = &[Version { major: 1, minor: 0 }];

/// Capabilities this build offers.
pub fn local_caps() -> Vec<String> {
    vec![
        "hash:blake3".into(),
        "hash:sha256".into(),
        "resume:v1".into(),
        "tree:v1".into(),
        "batch:v1".into(),
        "lanes:v1".into(),
    ]
}

/// The client's first frame; `stall` is the client's stall limit, so the
/// server can send keepalives often enough for it.
pub fn client_hello(token: &[u8], agent: &str, stall: Duration) -> Message {
    Message::Hello {
        versions: SUPPORTED_VERSIONS.to_vec(),
        caps: local_caps(),
        token: Bytes::copy_from_slice(token),
        agent: agent.to_string(),
        stall_ms: Some(millis(stall)),
    }
}

/// A stall limit as `Hello`/`Welcome` carry it.
pub fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// How often to send keepalives: our own interval, or more often if the
/// peer's stall limit (from `Hello`/`Welcome`) needs it — a third of it, never
/// below 100 ms. Without this, a server run with a short stall limit would
/// take an idle lane of a client with the default keepalive for dead.
pub fn keepalive_for(ours: Duration, peer_stall_ms: Option<u64>) -> Duration {
    match peer_stall_ms {
        Some(ms) => ours.min((Duration::from_millis(ms) / 3).max(Duration::from_millis(100))),
        None => ours,
    }
}

/// What both ends agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: Version,
    pub caps: Vec<String>,
}

impl Negotiated {
    /// Hash algorithms both ends support, in order of preference.
    pub fn hash_algs(&self) -> Vec<HashAlg> {
        let mut algs: Vec<HashAlg> = self
            .caps
            .iter()
            .filter_map(|c| c.strip_prefix("hash:"))
            .filter_map(HashAlg::from_name)
            .collect();
        algs.sort_by_key(|a| match a {
            HashAlg::Blake3 => 0,
            HashAlg::Sha256 => 1,
        });
        algs
    }
}

/// Server side: chooses a version and the shared capabilities.
pub fn negotiate(versions: &[Version], caps: &[String]) -> Result<Negotiated, Failure> {
    let version = SUPPORTED_VERSIONS
        .iter()
        .filter_map(|ours| {
            versions
                .iter()
                .filter(|v| v.major == ours.major)
                .map(|v| Version {
                    major: v.major,
                    minor: v.minor.min(ours.minor),
                })
                .max()
        })
        .max();
    let Some(version) = version else {
        let theirs: Vec<String> = versions
            .iter()
            .map(|v| format!("{}.{}", v.major, v.minor))
            .collect();
        return Err(Failure::new(
            FailureCode::VersionRefused,
            format!(
                "no common protocol version: peer speaks [{}], this server speaks 1.x",
                theirs.join(", ")
            ),
        ));
    };
    let ours = local_caps();
    let shared: Vec<String> = caps.iter().filter(|c| ours.contains(c)).cloned().collect();
    Ok(Negotiated {
        version,
        caps: shared,
    })
}

/// Client side: checks the server's `Welcome`.
pub fn accept_welcome(version: Version, caps: &[String]) -> Result<Negotiated, Failure> {
    if !SUPPORTED_VERSIONS.iter().any(|v| v.major == version.major) {
        return Err(Failure::new(
            FailureCode::VersionRefused,
            format!(
                "server chose protocol {}.{}, which this client does not speak",
                version.major, version.minor
            ),
        ));
    }
    let ours = local_caps();
    Ok(Negotiated {
        version,
        caps: caps.iter().filter(|c| ours.contains(c)).cloned().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_fits_the_peers_stall_limit() {
        let ten = Duration::from_secs(10);
        assert_eq!(keepalive_for(ten, None), ten);
        assert_eq!(keepalive_for(ten, Some(60_000)), ten);
        assert_eq!(keepalive_for(ten, Some(3_000)), Duration::from_secs(1));
        assert_eq!(keepalive_for(ten, Some(0)), Duration::from_millis(100));
        assert_eq!(keepalive_for(ten, Some(u64::MAX)), ten);
        assert_eq!(
            keepalive_for(Duration::from_millis(50), Some(1_000)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn picks_shared_major_and_ignores_unknown_caps() {
        let n = negotiate(
            &[
                Version { major: 1, minor: 7 },
                Version { major: 2, minor: 0 },
            ],
            &["hash:blake3".into(), "warp-drive".into()],
        )
        .unwrap();
        assert_eq!(n.version, Version { major: 1, minor: 0 });
        assert_eq!(n.caps, vec!["hash:blake3".to_string()]);
        assert_eq!(n.hash_algs(), vec![HashAlg::Blake3]);
    }

    #[test]
    fn refuses_unknown_major() {
        let e = negotiate(&[Version { major: 9, minor: 0 }], &[]).unwrap_err();
        assert_eq!(e.code, FailureCode::VersionRefused);
        assert!(e.message.contains("9.0"));
        assert!(accept_welcome(Version { major: 3, minor: 0 }, &[]).is_err());
    }
}
