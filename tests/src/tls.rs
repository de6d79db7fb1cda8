//! [`TestPki`]: certificate authorities, server and client certificates for TLS tests, as PEM
//! files in a temporary directory (made with rcgen).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use crate::TempDir;

/// How long an ordinary certificate is valid from now.
const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// How far in the past an ordinary certificate's validity starts (for clock skew).
const BACKDATE: Duration = Duration::from_secs(3600);

/// The key type of a client certificate ([`TestPki::client_with_key`]). Every key file is
/// PKCS#8 PEM (`PRIVATE KEY`); the CAs themselves use EC P-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256 with SHA-256 (the default).
    EcP256,
    /// Ed25519.
    Ed25519,
    /// RSA, 2048 bits, signing with SHA-256 (rcgen generates RSA keys with aws-lc-rs).
    Rsa2048,
}

impl KeyKind {
    /// A fresh key of this kind.
    fn generate(self) -> KeyPair {
        let generated = match self {
            KeyKind::EcP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyKind::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
            KeyKind::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
        };
        generated.unwrap_or_else(|e| panic!("generate a {self:?} key: {e}"))
    }

    /// The file name part for certificates with this kind of key.
    fn slug(self) -> &'static str {
        match self {
            KeyKind::EcP256 => "ec-p256",
            KeyKind::Ed25519 => "ed25519",
            KeyKind::Rsa2048 => "rsa-2048",
        }
    }
}

/// A certificate and its private key as PEM files, with what tells it from another
/// certificate at the same paths (after [`TestPki::renew_client`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate (PEM `CERTIFICATE`).
    pub cert: PathBuf,
    /// Its private key (PEM `PRIVATE KEY`, PKCS#8).
    pub key: PathBuf,
    /// The certificate's serial number, lowercase hex without separators.
    pub serial: String,
    /// The end of its validity (notAfter), to the second.
    pub not_after: SystemTime,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
enum Validity {
    /// From an hour ago for a year (plus a minute per certificate issued before it).
    Current,
    /// Ended yesterday.
    Expired,
    /// Starts in a month.
    NotYetValid,
    /// Valid now, for 10 more days.
    ExpiringSoon,
}

/// A test PKI: a CA, a server certificate for `127.0.0.1` and `localhost` signed by it, client
/// certificates on demand, and the broken certificates TLS tests need (expired, not yet
/// valid, wrong name, from a second, unrelated CA). Removed with its directory when dropped,
/// so it must outlive any broker or process that reads its files.
///
/// Every certificate it issues has its own serial number and expires a minute later than the
/// one issued before it, so both tell two certificates at the same paths apart.
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    other_ca: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    server: CertFiles,
    issued: AtomicU64,
}

impl TestPki {
    /// Creates both CAs and the server certificate in a new temporary directory.
    pub fn new() -> TestPki {
        let dir = TempDir::new("ksm-pki");
        let ca = new_ca("ksm-tests CA");
        let other_ca = new_ca("ksm-tests unrelated CA");
        let ca_file = dir.path().join("ca.crt");
        let other_ca_file = dir.path().join("other-ca.crt");
        write_atomic(&ca_file, &ca.pem());
        write_atomic(&other_ca_file, &other_ca.pem());
        let server = sign(
            dir.path(),
            0,
            server_params(&["127.0.0.1", "localhost"]),
            "server",
            KeyKind::EcP256.generate(),
            &ca,
            Validity::Current,
        );
        TestPki {
            dir,
            ca,
            other_ca,
            ca_file,
            other_ca_file,
            server,
            issued: AtomicU64::new(1),
        }
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA's certificate: what clients trust for the broker, and the broker for clients.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The certificate of a second CA, which signed neither the server certificate nor the
    /// ordinary client certificates (a client that trusts only it refuses the broker).
    pub fn other_ca_file(&self) -> &Path {
        &self.other_ca_file
    }

    /// The server certificate, for `127.0.0.1` (IP SAN) and `localhost` (DNS SAN).
    pub fn server(&self) -> &CertFiles {
        &self.server
    }

    /// A new server certificate from the CA whose only name is `wrong.example`.
    pub fn wrong_name_server(&self) -> CertFiles {
        self.issue_server("server-wrong-name", &["wrong.example"], Validity::Current)
    }

    /// A new server certificate from the CA for `127.0.0.1` and `localhost` that expired
    /// yesterday.
    pub fn expired_server(&self) -> CertFiles {
        self.issue_server(
            "server-expired",
            &["127.0.0.1", "localhost"],
            Validity::Expired,
        )
    }

    /// A new client certificate from the CA with CN `name` and an EC P-256 key, at
    /// `client-<name>.crt` and `.key` (replacing any there).
    pub fn client(&self, name: &str) -> CertFiles {
        self.issue_client(name, &format!("client-{name}"), &self.ca, Validity::Current)
    }

    /// Like [`TestPki::client`] with a key of `kind`, at `client-<name>-<kind>.crt` and `.key`.
    pub fn client_with_key(&self, name: &str, kind: KeyKind) -> CertFiles {
        let stem = format!("client-{name}-{}", kind.slug());
        let key = kind.generate();
        self.sign(client_params(name), &stem, key, &self.ca, Validity::Current)
    }

    /// Renews [`TestPki::client`]'s certificate for `name`: a new certificate for the same key
    /// (new serial, later expiry) replaces the old one at the same path. The file is replaced
    /// by a rename, so a reader sees the old certificate or the new one, never a mix, and
    /// either matches the key.
    ///
    /// Panics if [`TestPki::client`] was not called for `name` before.
    pub fn renew_client(&self, name: &str) -> CertFiles {
        let stem = format!("client-{name}");
        let key_path = self.dir.path().join(format!("{stem}.key"));
        let pem = std::fs::read_to_string(&key_path).unwrap_or_else(|e| {
            panic!("read {} to renew its certificate: {e}", key_path.display())
        });
        let key =
            KeyPair::from_pem(&pem).unwrap_or_else(|e| panic!("parse {}: {e}", key_path.display()));
        self.sign(client_params(name), &stem, key, &self.ca, Validity::Current)
    }

    /// A client certificate from the CA with CN `name` that expired yesterday.
    pub fn expired_client(&self, name: &str) -> CertFiles {
        let stem = format!("client-{name}-expired");
        self.issue_client(name, &stem, &self.ca, Validity::Expired)
    }

    /// A client certificate from the CA with CN `name` that becomes valid only in a month.
    pub fn not_yet_valid_client(&self, name: &str) -> CertFiles {
        let stem = format!("client-{name}-not-yet-valid");
        self.issue_client(name, &stem, &self.ca, Validity::NotYetValid)
    }

    /// A client certificate from the CA with CN `name`, valid now and for 10 more days.
    pub fn expiring_client(&self, name: &str) -> CertFiles {
        let stem = format!("client-{name}-expiring");
        self.issue_client(name, &stem, &self.ca, Validity::ExpiringSoon)
    }

    /// A current client certificate with CN `name` from the second, unrelated CA.
    pub fn foreign_client(&self, name: &str) -> CertFiles {
        let stem = format!("client-{name}-foreign");
        self.issue_client(name, &stem, &self.other_ca, Validity::Current)
    }

    /// A new EC P-256 key (PKCS#8 PEM) at `unmatched.key`, belonging to no certificate: with
    /// any certificate here it makes a pair whose key does not match.
    pub fn unmatched_key(&self) -> PathBuf {
        let path = self.dir.path().join("unmatched.key");
        write_atomic(&path, &KeyKind::EcP256.generate().serialize_pem());
        path
    }

    /// Issues a server certificate from the CA for `names` at `<stem>.crt` and `.key`.
    fn issue_server(&self, stem: &str, names: &[&str], validity: Validity) -> CertFiles {
        let key = KeyKind::EcP256.generate();
        self.sign(server_params(names), stem, key, &self.ca, validity)
    }

    /// Issues a client certificate with CN `name` and a fresh EC P-256 key at `<stem>.crt`.
    fn issue_client(
        &self,
        name: &str,
        stem: &str,
        issuer: &CertifiedIssuer<'static, KeyPair>,
        validity: Validity,
    ) -> CertFiles {
        let key = KeyKind::EcP256.generate();
        self.sign(client_params(name), stem, key, issuer, validity)
    }

    /// Signs the next certificate ([`sign`]).
    fn sign(
        &self,
        params: CertificateParams,
        stem: &str,
        key: KeyPair,
        issuer: &CertifiedIssuer<'static, KeyPair>,
        validity: Validity,
    ) -> CertFiles {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        sign(self.dir.path(), n, params, stem, key, issuer, validity)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// A self-signed CA named `name`, with an EC P-256 key, valid from yesterday for ten years.
fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    CertifiedIssuer::self_signed(params, KeyKind::EcP256.generate())
        .unwrap_or_else(|e| panic!("create the CA {name:?}: {e}"))
}

/// Parameters of a server certificate for `names` (IP addresses or DNS names).
fn server_params(names: &[&str]) -> CertificateParams {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names.clone())
        .unwrap_or_else(|e| panic!("server certificate names {names:?}: {e}"));
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "ksm-tests broker");
    params
        .extended_key_usages
        .push(ExtendedKeyUsagePurpose::ServerAuth);
    params
}

/// Parameters of a client certificate whose CN is `name` (Mosquitto's
/// `use_identity_as_username` makes it the username).
fn client_params(name: &str) -> CertificateParams {
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "client name {name:?} must be letters, digits, '-', '_' or '.' (it names files)"
    );
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .extended_key_usages
        .push(ExtendedKeyUsagePurpose::ClientAuth);
    params
}

/// Completes `params` for the `n`th certificate (serial, validity, key usage), signs it with
/// `issuer`, and writes the certificate and `key` at `<stem>.crt` and `<stem>.key` in `dir`.
fn sign(
    dir: &Path,
    n: u64,
    mut params: CertificateParams,
    stem: &str,
    key: KeyPair,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    validity: Validity,
) -> CertFiles {
    let serial = serial_number(n);
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|e| panic!("truncate the time to seconds: {e}"));
    let day = time::Duration::days(1);
    let (not_before, not_after) = match validity {
        Validity::Current => {
            let later = i64::try_from(n).unwrap_or_else(|e| panic!("certificate number {n}: {e}"));
            (
                now - BACKDATE,
                now + VALIDITY + time::Duration::minutes(later),
            )
        }
        Validity::Expired => (now - 30 * day, now - day),
        Validity::NotYetValid => (now + 30 * day, now + 60 * day),
        Validity::ExpiringSoon => (now - BACKDATE, now + 10 * day),
    };
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, issuer)
        .unwrap_or_else(|e| panic!("sign the certificate {stem}: {e}"));
    let files = CertFiles {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
        serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        not_after: not_after.into(),
    };
    write_atomic(&files.key, &key.serialize_pem());
    write_atomic(&files.cert, &cert.pem());
    files
}

/// A 16-byte serial number for the `n`th certificate, unique to this process and time: the
/// time in nanoseconds, then `n`.
fn serial_number(n: u64) -> [u8; 16] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut serial = [0u8; 16];
    // The low 64 bits of the time.
    serial[..8].copy_from_slice(&(nanos as u64).to_be_bytes());
    serial[8..].copy_from_slice(&n.to_be_bytes());
    // Positive, and no leading zero byte for DER to drop: the hex is the serial as encoded.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

/// Writes `contents` to `path` through a temporary file and a rename, so that a reader sees
/// the old file or the new one, never part of one.
fn write_atomic(path: &Path, contents: &str) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), path.display()));
}
