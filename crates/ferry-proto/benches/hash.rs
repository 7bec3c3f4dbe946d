//! Chunk hashing throughput of the two algorithms, single core, as ferry uses
//! them (one chunk at a time). Prints MB/s, median of 7 runs; run with
//! `cargo bench -p ferry-proto --bench hash`.

#![allow(clippy::disallowed_methods)] // a benchmark measures wall time

use std::time::Instant;

use ferry_proto::HashAlg;

fn main() {
    let chunk = vec![0x5au8; 512 * 1024];
    let total: usize = 512 << 20;
    println!("{:<8} {:>10}", "alg", "MB/s");
    for alg in [HashAlg::Blake3, HashAlg::Sha256] {
        let mut rates = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            let mut acc = 0u8;
            for _ in 0..total / chunk.len() {
                acc ^= alg.hash(&chunk).0[0];
            }
            std::hint::black_box(acc);
            rates.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);
        }
        rates.sort_by(|a, b| a.total_cmp(b));
        println!("{:<8} {:>10.0}", alg.name(), rates[3]);
    }
}
