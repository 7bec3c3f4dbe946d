//! Chunk hashes, position binding and the whole-file digest.
//!
//! * The *content hash* of a chunk is `H(chunk bytes)`.
//! * The *tag* sent with a chunk binds that content hash to where it belongs:
//!   `H("ferry chunk v1" | alg | transfer id | index | offset | length | content hash)`.
//!   A chunk replayed at another index, offset or into another transfer fails.
//! * The *file digest* is `H("ferry file v1" | alg | size | chunk size | content hash 0 | …)`,
//!   computable by both ends from per-chunk hashes without re-reading data that
//!   was verified earlier.

use std::fmt;

use sha2::Digest as _;

/// A hash algorithm both ends can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// BLAKE3: the default, ~3.5× SHA-256 with SHA-NI on one core and faster without it.
    Blake3,
    /// SHA-256, for peers and policies that require it.
    Sha256,
}

impl HashAlg {
    /// Name used in capabilities and output.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Blake3 => "blake3",
            HashAlg::Sha256 => "sha256",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "blake3" => Some(HashAlg::Blake3),
            "sha256" => Some(HashAlg::Sha256),
            _ => None,
        }
    }

    /// Hashes `data` in one go.
    pub fn hash(self, data: &[u8]) -> ChunkHash {
        let mut h = Hasher::new(self);
        h.update(data);
        h.finalize()
    }
}

/// An incremental hasher for either algorithm.
#[derive(Clone)]
pub enum Hasher {
    Blake3(Box<blake3::Hasher>),
    Sha256(sha2::Sha256),
}

impl Hasher {
    pub fn new(alg: HashAlg) -> Self {
        match alg {
            HashAlg::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
            HashAlg::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Blake3(h) => {
                h.update(data);
            }
            Hasher::Sha256(h) => h.update(data),
        }
    }

    pub fn finalize(self) -> ChunkHash {
        match self {
            Hasher::Blake3(h) => ChunkHash(*h.finalize().as_bytes()),
            Hasher::Sha256(h) => ChunkHash(h.finalize().into()),
        }
    }
}

/// A 32-byte hash value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 15)] as char);
        }
        s
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A transfer's identity: 16 random bytes chosen by the side that starts it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct TransferId(pub [u8; 16]);

impl TransferId {
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(TransferId(out))
    }
}

impl fmt::Debug for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The tag that binds a chunk's content hash to its place in a transfer.
pub fn chunk_tag(
    alg: HashAlg,
    id: &TransferId,
    index: u32,
    offset: u64,
    len: u32,
    content: &ChunkHash,
) -> ChunkHash {
    let mut h = Hasher::new(alg);
    h.update(b"ferry chunk v1\0");
    h.update(alg.name().as_bytes());
    h.update(&id.0);
    h.update(&index.to_be_bytes());
    h.update(&offset.to_be_bytes());
    h.update(&len.to_be_bytes());
    h.update(&content.0);
    h.finalize()
}

/// Verifies a received chunk against its tag; returns its content hash.
pub fn verify_chunk(
    alg: HashAlg,
    id: &TransferId,
    index: u32,
    offset: u64,
    data: &[u8],
    tag: &ChunkHash,
) -> Result<ChunkHash, ChunkHash> {
    let content = alg.hash(data);
    let expect = chunk_tag(alg, id, index, offset, data.len() as u32, &content);
    if &expect == tag {
        Ok(content)
    } else {
        Err(content)
    }
}

/// The whole-file digest computed from the per-chunk content hashes, in order.
pub fn file_digest<'a>(
    alg: HashAlg,
    size: u64,
    chunk_size: u32,
    hashes: impl IntoIterator<Item = &'a ChunkHash>,
) -> ChunkHash {
    let mut h = Hasher::new(alg);
    h.update(b"ferry file v1\0");
    h.update(alg.name().as_bytes());
    h.update(&size.to_be_bytes());
    h.update(&chunk_size.to_be_bytes());
    for c in hashes {
        h.update(&c.0);
    }
    h.finalize()
}

/// The whole-file digest of a file that fits in one chunk, computed from its
/// content: the same value [`file_digest`] gives when it is sent in chunks.
pub fn small_file_digest(alg: HashAlg, data: &[u8]) -> ChunkHash {
    let layout = crate::chunk::ChunkLayout::for_size(data.len() as u64);
    let content = alg.hash(data);
    let hashes: &[ChunkHash] = if layout.count() == 0 {
        &[]
    } else {
        std::slice::from_ref(&content)
    };
    file_digest(alg, layout.size(), layout.chunk_size(), hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_file_digest_matches_the_chunked_digest() {
        for alg in [HashAlg::Blake3, HashAlg::Sha256] {
            for data in [&b""[..], b"x", &[7u8; 256 * 1024][..]] {
                let layout = crate::chunk::ChunkLayout::for_size(data.len() as u64);
                let hashes: Vec<ChunkHash> = (0..layout.count())
                    .map(|i| {
                        let (o, l) = (layout.offset(i) as usize, layout.len(i) as usize);
                        alg.hash(&data[o..o + l])
                    })
                    .collect();
                assert_eq!(
                    small_file_digest(alg, data),
                    file_digest(alg, layout.size(), layout.chunk_size(), &hashes)
                );
            }
        }
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            HashAlg::Sha256.hash(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            HashAlg::Blake3.hash(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn tag_binds_position() {
        let id = TransferId([7; 16]);
        for alg in [HashAlg::Blake3, HashAlg::Sha256] {
            let data = b"hello chunk";
            let c = alg.hash(data);
            let tag = chunk_tag(alg, &id, 3, 3 * 1024, data.len() as u32, &c);
            assert_eq!(verify_chunk(alg, &id, 3, 3 * 1024, data, &tag), Ok(c));
            assert!(verify_chunk(alg, &id, 4, 3 * 1024, data, &tag).is_err());
            assert!(verify_chunk(alg, &id, 3, 4 * 1024, data, &tag).is_err());
            assert!(verify_chunk(alg, &TransferId([8; 16]), 3, 3 * 1024, data, &tag).is_err());
            assert!(verify_chunk(alg, &id, 3, 3 * 1024, b"hellO chunk", &tag).is_err());
        }
    }

    #[test]
    fn transfer_id_hex_roundtrip() {
        let id = TransferId([0xab; 16]);
        assert_eq!(TransferId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(TransferId::from_hex("zz"), None);
    }
}
