//! How a file is cut into chunks.
//!
//! Chunk size is chosen from the file size: the smallest power of two that
//! keeps the file within [`TARGET_CHUNKS`] chunks, clamped to
//! [`MIN_CHUNK`]..=[`MAX_CHUNK`]. Small chunks bound what a crash or a corrupt
//! chunk costs to re-send; large chunks amortise per-chunk costs (a hash, a
//! frame header, a journal row, a handoff to a blocking thread). 1 GiB gives
//! 1 MiB chunks, 100 GiB gives 128 MiB... clamped to 8 MiB (12 800 chunks,
//! 400 KiB of hashes). Going from 2048 to 1024 chunks per file cut a 1 GiB
//! upload's server CPU by ~12 % on loopback.

/// Smallest chunk: below this per-chunk overhead starts to show.
pub const MIN_CHUNK: u32 = 256 * 1024;
/// Largest chunk: bounds the receiver's per-frame buffer.
pub const MAX_CHUNK: u32 = 8 * 1024 * 1024;
/// Aim for at most this many chunks per file.
pub const TARGET_CHUNKS: u64 = 1024;
/// Largest chunk count a peer may announce (bounds every per-chunk table to
/// ~33 MiB; with 8 MiB chunks that is files up to 8 TiB).
pub const MAX_CHUNKS: u64 = 1 << 20;

/// Picks the chunk size for a file of `size` bytes.
pub fn choose_chunk_size(size: u64) -> u32 {
    let want = size.div_ceil(TARGET_CHUNKS).max(1).next_power_of_two();
    want.clamp(u64::from(MIN_CHUNK), u64::from(MAX_CHUNK)) as u32
}

/// The chunk geometry of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLayout {
    size: u64,
    chunk_size: u32,
}

impl ChunkLayout {
    /// Validates a geometry announced by a peer (or chosen locally).
    pub fn new(size: u64, chunk_size: u32) -> Option<Self> {
        if !(1024..=MAX_CHUNK).contains(&chunk_size) {
            return None;
        }
        let layout = Self { size, chunk_size };
        if u64::from(layout.count()) > MAX_CHUNKS
            || size.div_ceil(u64::from(chunk_size)) > MAX_CHUNKS
        {
            return None;
        }
        Some(layout)
    }

    /// The layout ferry picks for a file of `size` bytes.
    pub fn for_size(size: u64) -> Self {
        Self {
            size,
            chunk_size: choose_chunk_size(size),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of chunks; an empty file has none.
    pub fn count(&self) -> u32 {
        self.size.div_ceil(u64::from(self.chunk_size)) as u32
    }

    /// Byte offset of chunk `index`.
    pub fn offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.chunk_size)
    }

    /// Length of chunk `index` (the last one may be short); 0 past the end.
    pub fn len(&self, index: u32) -> u32 {
        let off = self.offset(index);
        if off >= self.size {
            return 0;
        }
        (self.size - off).min(u64::from(self.chunk_size)) as u32
    }

    /// Whether this file has no chunks at all.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Total bytes of the chunks in `set`.
    pub fn bytes_in(&self, set: &crate::ranges::RangeSet) -> u64 {
        set.iter_ranges()
            .map(|r| r.clone().map(|i| u64::from(self.len(i))).sum::<u64>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_choice() {
        assert_eq!(choose_chunk_size(0), MIN_CHUNK);
        assert_eq!(choose_chunk_size(1), MIN_CHUNK);
        assert_eq!(choose_chunk_size(1 << 30), 1024 * 1024);
        assert_eq!(choose_chunk_size(256 << 20), MIN_CHUNK);
        assert_eq!(choose_chunk_size(100 << 30), MAX_CHUNK);
    }

    #[test]
    fn geometry_of_interesting_sizes() {
        let c = u64::from(MIN_CHUNK);
        for (size, count, last) in [
            (0, 0, 0),
            (1, 1, 1),
            (c - 1, 1, c - 1),
            (c, 1, c),
            (c + 1, 2, 1),
            (10 * c + 5, 11, 5),
        ] {
            let l = ChunkLayout::new(size, MIN_CHUNK).unwrap();
            assert_eq!(l.count(), count, "size {size}");
            if count > 0 {
                assert_eq!(u64::from(l.len(count - 1)), last);
            }
            assert_eq!(l.len(count), 0);
            let total: u64 = (0..l.count()).map(|i| u64::from(l.len(i))).sum();
            assert_eq!(total, size);
        }
    }

    #[test]
    fn rejects_hostile_geometry() {
        assert!(ChunkLayout::new(10, 0).is_none());
        assert!(ChunkLayout::new(10, MAX_CHUNK + 1).is_none());
        assert!(ChunkLayout::new(u64::MAX, 1024).is_none());
    }
}
