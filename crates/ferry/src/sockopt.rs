//! Options ferry sets on its TCP connections, in one place (client and server).

use std::sync::OnceLock;

use tokio::net::TcpStream;

/// Applies ferry's options to a connected TCP socket. Each is an optimisation, so a
/// failure is ignored.
pub fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    if let Some(size) = send_buffer_request() {
        let _ = socket2::SockRef::from(tcp).set_send_buffer_size(size);
    }
}

/// The `SO_SNDBUF` to ask for, if asking beats the kernel's autotuning.
///
/// A single TCP stream moves at most its send buffer per round trip. Autotuning grows
/// the buffer up to `net.ipv4.tcp_wmem`'s maximum (4 MiB by default: ~80 MB/s at 50 ms);
/// an explicit request is doubled by the kernel and capped at 2 × `net.core.wmem_max`,
/// and turns autotuning off. Hosts tuned for long fat pipes raise `wmem_max`; there the
/// request gives a larger buffer (measured: +30 % at 50 ms RTT, +70 % at 1 % loss,
/// docs/BENCH-WAN.md). On stock kernels `wmem_max` is 208 KiB and a request would
/// *shrink* the buffer, so nothing is asked.
fn send_buffer_request() -> Option<usize> {
    static REQUEST: OnceLock<Option<usize>> = OnceLock::new();
    *REQUEST.get_or_init(|| {
        let wmem_max = read_field("/proc/sys/net/core/wmem_max", 0)?;
        let autotune_max = read_field("/proc/sys/net/ipv4/tcp_wmem", 2)?;
        send_buffer_for(wmem_max, autotune_max)
    })
}

/// Asks for `wmem_max` only when the kernel's doubling of it exceeds what autotuning reaches.
fn send_buffer_for(wmem_max: usize, autotune_max: usize) -> Option<usize> {
    (wmem_max.saturating_mul(2) > autotune_max).then_some(wmem_max)
}

fn read_field(path: &str, index: usize) -> Option<usize> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .nth(index)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::send_buffer_for;

    #[test]
    fn asks_only_when_it_beats_autotuning() {
        // Stock kernel: wmem_max 208 KiB, tcp_wmem max 4 MiB: leave autotuning alone.
        assert_eq!(send_buffer_for(212_992, 4_194_304), None);
        // Tuned host: wmem_max 4 MiB gives an 8 MiB buffer, above autotuning's 4 MiB.
        assert_eq!(send_buffer_for(4_194_304, 4_194_304), Some(4_194_304));
        // Autotuning already reaches further.
        assert_eq!(send_buffer_for(4_194_304, 16_777_216), None);
    }
}
