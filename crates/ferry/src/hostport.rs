//! `HOST[:PORT]` as users write it in URLs, checked at once: a typo in an
//! address is a usage error, never something to retry or queue.

use std::net::Ipv6Addr;

/// Parses `HOST`, `HOST:PORT`, `[IPV6]` or `[IPV6]:PORT` into
/// `(host, port)`; the port is `default_port` when none is written. The
/// error says what is wrong, in a phrase that follows the address.
pub fn parse(hostport: &str, default_port: u16) -> Result<(String, u16), String> {
    if hostport.is_empty() {
        return Err("missing host".into());
    }
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| "unclosed '[' (write an IPv6 address as [ADDR]:PORT)".to_string())?;
        if inner.parse::<Ipv6Addr>().is_err() {
            return Err(format!("[{inner}] is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {p:?} after ']' (expected :PORT)"))?,
            ),
        };
        (inner.to_string(), port)
    } else {
        let (host, port) = match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        };
        if port.is_some_and(|p| p.contains(':')) {
            return Err("an IPv6 address must be written in brackets: [ADDR]:PORT".into());
        }
        if host.is_empty() {
            return Err("missing host".into());
        }
        if host.len() > 253
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(format!("{host:?} is not a valid host name"));
        }
        (host.to_string(), port)
    };
    let port = match port {
        None => default_port,
        Some(p) => parse_port(p)?,
    };
    Ok((host, port))
}

/// A port number from 1 to 65535.
pub fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!("port {p:?} is not a number from 1 to 65535")),
    }
}

/// `host:port`, with an IPv6 host in brackets.
pub fn join(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_addresses_parse_and_bad_ones_say_why() {
        let ok = [
            ("server", ("server", 7787)),
            ("server:1", ("server", 1)),
            ("10.0.0.1:65535", ("10.0.0.1", 65535)),
            ("[::1]", ("::1", 7787)),
            ("[fe80::1]:22", ("fe80::1", 22)),
            ("my_host.example-1.org:80", ("my_host.example-1.org", 80)),
        ];
        for (s, (h, p)) in ok {
            assert_eq!(parse(s, 7787), Ok((h.to_string(), p)), "{s}");
        }
        let bad = [
            ("", "missing host"),
            (":80", "missing host"),
            ("host:http", "not a number"),
            ("host:0", "not a number"),
            ("host:65536", "not a number"),
            ("host:+80", "not a number"),
            ("host:", "not a number"),
            ("[::1", "unclosed"),
            ("[::1]80", "after ']'"),
            ("[nope]:80", "not an IPv6"),
            ("::1", "brackets"),
            ("ho st", "not a valid host"),
        ];
        for (s, why) in bad {
            let e = parse(s, 7787).unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
        assert_eq!(join("::1", 5), "[::1]:5");
        assert_eq!(join("h", 5), "h:5");
    }
}
