//! TLS 1.3 with self-made server certificates and SSH-style pinning.
//!
//! The server makes a self-signed certificate on first start and keeps it in
//! its state directory. Clients identify it by the SHA-256 fingerprint of that
//! certificate: given with `--fingerprint`, or pinned on first use in a
//! known-servers file and refused if it ever changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    aws_lc_rs, verify_tls12_signature, verify_tls13_signature, CryptoProvider,
    WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::fsutil::{hex, write_atomic, write_private};

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// `SHA256:<hex>` of a DER certificate.
pub fn fingerprint(cert: &[u8]) -> String {
    format!("SHA256:{}", hex(&Sha256::digest(cert)))
}

/// Normalises a user-given fingerprint (case, optional prefix, colons), or
/// says why it is not one: a SHA-256 is 64 hex digits.
pub fn normalize_fingerprint(s: &str) -> Result<String> {
    let body = s
        .trim()
        .strip_prefix("SHA256:")
        .or_else(|| s.trim().strip_prefix("sha256:"))
        .unwrap_or(s.trim());
    let hex = body.replace(':', "").to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Usage(format!(
            "--fingerprint {s:?} is not a server fingerprint: expected SHA256: and 64 hex digits, as `ferry serve` prints it"
        )));
    }
    Ok(format!("SHA256:{hex}"))
}

/// The server's identity: certificate and key, made once and kept.
pub struct ServerIdentity {
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl ServerIdentity {
    /// Loads `DIR/server.crt` + `DIR/server.key`, or makes them.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let cert_path = dir.join("server.crt.der");
        let key_path = dir.join("server.key.der");
        match (std::fs::read(&cert_path), std::fs::read(&key_path)) {
            (Ok(c), Ok(k)) => {
                return Ok(Self {
                    cert: CertificateDer::from(c),
                    key: PrivatePkcs8KeyDer::from(k),
                })
            }
            (Err(c), Err(k))
                if c.kind() == std::io::ErrorKind::NotFound
                    && k.kind() == std::io::ErrorKind::NotFound => {}
            // One is there without the other, or unreadable: making a new
            // pair would silently change the fingerprint clients pinned.
            (c, k) => {
                let (path, e) = match (c, k) {
                    (Err(e), _) => (&cert_path, e),
                    (_, Err(e)) => (&key_path, e),
                    _ => unreachable!("both were read"),
                };
                return Err(Error::Tls(format!(
                    "{}: {e}; the server's identity is incomplete. Restore it, or remove both \
                     server.crt.der and server.key.der to make a new one (clients will then \
                     see a new fingerprint)",
                    path.display()
                )));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::local(dir, e))?;
        let ck = rcgen::generate_simple_self_signed(vec!["ferry".to_string()])
            .map_err(|e| Error::Tls(e.to_string()))?;
        let cert = ck.cert.der().to_vec();
        let key = ck.key_pair.serialize_der();
        write_private(&key_path, &key)?;
        write_atomic(&cert_path, &cert)?;
        Ok(Self {
            cert: CertificateDer::from(cert),
            key: PrivatePkcs8KeyDer::from(key),
        })
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .map_err(|e| Error::Tls(e.to_string()))
    }
}

/// The known-servers file: one `host:port SHA256:hex` per line.
#[derive(Debug, Clone)]
pub struct KnownServers {
    path: PathBuf,
}

impl KnownServers {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The canonical form of `host:port` used in the file: host names are
    /// case-insensitive, IPv6 addresses are bracketed, the port is explicit
    /// (7787 when missing).
    pub fn canonical(addr: &str) -> String {
        let addr = addr.trim();
        let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
            match rest.split_once(']') {
                Some((h, p)) => (h.to_string(), p.strip_prefix(':').unwrap_or("").to_string()),
                None => (rest.to_string(), String::new()),
            }
        } else if addr.matches(':').count() > 1 {
            // A bare IPv6 address without a port.
            (addr.to_string(), String::new())
        } else {
            match addr.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.to_string()),
                None => (addr.to_string(), String::new()),
            }
        };
        let host = host.to_ascii_lowercase();
        let port = if port.is_empty() {
            "7787".to_string()
        } else {
            port
        };
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    pub fn lookup(&self, host: &str) -> Option<String> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let want = Self::canonical(host);
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(h, _)| Self::canonical(h) == want)
            .map(|(_, f)| f.trim().to_string())
    }

    pub fn record(&self, host: &str, fp: &str) -> Result<()> {
        let host = Self::canonical(host);
        let mut text = std::fs::read_to_string(&self.path).unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{host} {fp}\n"));
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::local(d, e))?;
        }
        write_atomic(&self.path, text.as_bytes())
    }
}

/// Accepts exactly one certificate fingerprint, or (when none is known yet)
/// any certificate whose handshake signature verifies, remembering what it saw.
#[derive(Debug)]
struct PinVerifier {
    expected: Option<String>,
    seen: Mutex<Option<String>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(fp.clone());
        }
        match &self.expected {
            Some(e) if *e != fp => Err(rustls::Error::General(format!(
                "server fingerprint {fp} does not match the pinned {e}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used by ferry".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// For the outer TLS of `wss://`, which only wraps the session so that it
/// passes networks where just HTTPS gets through. It does not authenticate
/// anything: ferry's own pinned TLS runs end to end inside the WebSocket,
/// whatever terminates the outer layer (ferry itself or a reverse proxy with
/// a certificate of its own). So any certificate is accepted, while the
/// handshake signatures are still checked.
#[derive(Debug)]
struct OuterVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for OuterVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client settings for the outer TLS of `wss://` (see [`OuterVerifier`]):
/// TLS 1.2 or 1.3, ALPN `http/1.1`, any certificate.
pub fn outer_client_config() -> Result<rustls::ClientConfig> {
    let p = provider();
    let verifier = Arc::new(OuterVerifier {
        algs: p.signature_verification_algorithms,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Tells, after a handshake, which fingerprint the server presented.
pub type SeenFingerprint = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// A client TLS configuration pinned to `expected` (or trust-on-first-use when `None`).
/// The returned handle tells which fingerprint the server presented.
pub fn client_config(expected: Option<String>) -> Result<(rustls::ClientConfig, SeenFingerprint)> {
    let p = provider();
    let verifier = Arc::new(PinVerifier {
        expected,
        seen: Mutex::new(None),
        algs: p.signature_verification_algorithms,
    });
    let cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let seen: SeenFingerprint = Arc::new(move || verifier.seen.lock().ok().and_then(|s| s.clone()));
    Ok((cfg, seen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_is_kept_private_and_never_half_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let a = ServerIdentity::load_or_create(dir.path()).unwrap();
        let key = dir.path().join("server.key.der");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the private key must be 0600");
        // Loading again keeps the fingerprint.
        let b = ServerIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        // Only the certificate lost: refuse rather than change identity.
        std::fs::remove_file(dir.path().join("server.crt.der")).unwrap();
        let e = ServerIdentity::load_or_create(dir.path()).err().unwrap();
        assert!(e.to_string().contains("incomplete"), "{e}");
        assert!(key.exists(), "the key must not be replaced");
        // Both gone: a new identity is made.
        std::fs::remove_file(&key).unwrap();
        let c = ServerIdentity::load_or_create(dir.path()).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn known_servers_match_whatever_the_spelling() {
        assert_eq!(
            KnownServers::canonical("Example.COM:7787"),
            "example.com:7787"
        );
        assert_eq!(KnownServers::canonical("example.com"), "example.com:7787");
        assert_eq!(KnownServers::canonical("[::1]:9000"), "[::1]:9000");
        assert_eq!(KnownServers::canonical("::1"), "[::1]:7787");
        assert_eq!(KnownServers::canonical("[FE80::1]"), "[fe80::1]:7787");
        let dir = tempfile::tempdir().unwrap();
        let k = KnownServers::new(dir.path().join("known"));
        k.record("Host.Example:7787", "SHA256:ab").unwrap();
        assert_eq!(k.lookup("host.example:7787").as_deref(), Some("SHA256:ab"));
        assert_eq!(k.lookup("HOST.example").as_deref(), Some("SHA256:ab"));
        assert_eq!(k.lookup("host.example:7788"), None);
    }
}
