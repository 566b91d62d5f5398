//! Test credentials, generated on the spot (tests never commit a private key).
//!
//! [`generate`] writes, under a directory:
//!
//! | path | holds |
//! |---|---|
//! | `pki/` | CA "A" (`ca-cert.pem`), a server certificate for `127.0.0.1`, `::1` and `localhost` (`server-cert.pem`, `server-key.pem`) and a client certificate (`client-cert.pem`, `client-key.pem`): usable as a server's or a client's directory, by us, qemu (`tls-creds-x509`) and nbdkit (`--tls-certificates`) |
//! | `other/` | an unrelated CA "B" with its own server and client certificates (and key) (a client of B is refused by a server that verifies peers against A; a client trusting B refuses A's server) |
//! | `expired/` | CA A and a server certificate that expired yesterday (with its key), and A's client certificate |
//! | `keys.psk` | `flexnbd:<64 hex digits>` (psktool's format) |
//! | `other.psk` | the same username with another key |
//!
//! The x509 extensions are those GnuTLS insists on: the CAs have basicConstraints CA:TRUE
//! and keyUsage keyCertSign; leaves have keyUsage digitalSignature and keyEncipherment and
//! extendedKeyUsage serverAuth or clientAuth.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509Name, X509};

/// The PSK username of the generated key files.
pub const PSK_USER: &str = "flexnbd";

/// Where [`generate`] put everything.
#[derive(Clone, Debug)]
pub struct TestCredentials {
    pub pki: PathBuf,
    pub other: PathBuf,
    pub expired: PathBuf,
    pub psk: PathBuf,
    pub other_psk: PathBuf,
}

struct Ca {
    cert: X509,
    key: PKey<Private>,
}

fn key() -> Result<PKey<Private>, ErrorStack> {
    PKey::from_rsa(Rsa::generate(2048)?)
}

fn serial() -> Result<Asn1Integer, ErrorStack> {
    let mut bn = BigNum::new()?;
    bn.rand(120, MsbOption::MAYBE_ZERO, false)?;
    bn.to_asn1_integer()
}

fn name(cn: &str) -> Result<X509Name, ErrorStack> {
    let mut name = X509Name::builder()?;
    name.append_entry_by_text("O", "flexnbd tests")?;
    name.append_entry_by_text("CN", cn)?;
    Ok(name.build())
}

fn ca(cn: &str) -> Result<Ca, ErrorStack> {
    let key = key()?;
    let name = name(cn)?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = serial()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(&key)?;
    let (from, until) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(30)?);
    b.set_not_before(&from)?;
    b.set_not_after(&until)?;
    b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok(Ca {
        cert: b.build(),
        key,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Server,
    Client,
}

/// A leaf certificate for `key` signed by `ca`, valid from `days.0` to `days.1` days from
/// now.
fn leaf(
    ca: &Ca,
    key: &PKey<Private>,
    kind: Leaf,
    cn: &str,
    days: (i64, i64),
) -> Result<X509, ErrorStack> {
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = serial()?;
    b.set_serial_number(&serial)?;
    let subject = name(cn)?;
    b.set_subject_name(&subject)?;
    b.set_issuer_name(ca.cert.subject_name())?;
    b.set_pubkey(key)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let from = Asn1Time::from_unix(now + days.0 * 86400)?;
    let until = Asn1Time::from_unix(now + days.1 * 86400)?;
    b.set_not_before(&from)?;
    b.set_not_after(&until)?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_encipherment()
            .build()?,
    )?;
    let eku = match kind {
        Leaf::Server => ExtendedKeyUsage::new().server_auth().build()?,
        Leaf::Client => ExtendedKeyUsage::new().client_auth().build()?,
    };
    b.append_extension(eku)?;
    if kind == Leaf::Server {
        let san = SubjectAlternativeName::new()
            .ip(&IpAddr::V4(Ipv4Addr::LOCALHOST).to_string())
            .ip(&IpAddr::V6(Ipv6Addr::LOCALHOST).to_string())
            .dns("localhost")
            .build(&b.x509v3_context(Some(&ca.cert), None))?;
        b.append_extension(san)?;
    }
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(ski)?;
    let aki = AuthorityKeyIdentifier::new()
        .keyid(true)
        .build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(aki)?;
    b.sign(&ca.key, MessageDigest::sha256())?;
    Ok(b.build())
}

fn write(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    fs::write(path, bytes)?;
    if private {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn write_pair(dir: &Path, stem: &str, cert: &X509, key: &PKey<Private>) -> std::io::Result<()> {
    let pem = |r: Result<Vec<u8>, ErrorStack>| r.map_err(std::io::Error::other);
    write(
        &dir.join(format!("{stem}-cert.pem")),
        &pem(cert.to_pem())?,
        false,
    )?;
    write(
        &dir.join(format!("{stem}-key.pem")),
        &pem(key.private_key_to_pem_pkcs8())?,
        true,
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Generates the credentials described in the module docs under `dir` (which must exist).
pub fn generate(dir: &Path) -> std::io::Result<TestCredentials> {
    let ssl = std::io::Error::other;
    let creds = TestCredentials {
        pki: dir.join("pki"),
        other: dir.join("other"),
        expired: dir.join("expired"),
        psk: dir.join("keys.psk"),
        other_psk: dir.join("other.psk"),
    };
    for d in [&creds.pki, &creds.other, &creds.expired] {
        fs::create_dir_all(d)?;
    }
    let a = ca("flexnbd test CA A").map_err(ssl)?;
    let b = ca("flexnbd test CA B").map_err(ssl)?;
    let a_pem = a.cert.to_pem().map_err(ssl)?;
    let b_pem = b.cert.to_pem().map_err(ssl)?;

    // RSA keys take long to make: the leaves of one CA share a key (each CA's differs, so
    // a key from the other directory never matches a certificate).
    let (a_key, b_key) = (key().map_err(ssl)?, key().map_err(ssl)?);
    let server = leaf(&a, &a_key, Leaf::Server, "localhost", (-1, 30)).map_err(ssl)?;
    let client = leaf(&a, &a_key, Leaf::Client, "flexnbd client", (-1, 30)).map_err(ssl)?;
    write(&creds.pki.join("ca-cert.pem"), &a_pem, false)?;
    write_pair(&creds.pki, "server", &server, &a_key)?;
    write_pair(&creds.pki, "client", &client, &a_key)?;

    let server_b = leaf(&b, &b_key, Leaf::Server, "localhost", (-1, 30)).map_err(ssl)?;
    let client_b = leaf(&b, &b_key, Leaf::Client, "flexnbd other client", (-1, 30)).map_err(ssl)?;
    write(&creds.other.join("ca-cert.pem"), &b_pem, false)?;
    write_pair(&creds.other, "server", &server_b, &b_key)?;
    write_pair(&creds.other, "client", &client_b, &b_key)?;

    let old = leaf(&a, &a_key, Leaf::Server, "localhost", (-10, -1)).map_err(ssl)?;
    write(&creds.expired.join("ca-cert.pem"), &a_pem, false)?;
    write_pair(&creds.expired, "server", &old, &a_key)?;
    write_pair(&creds.expired, "client", &client, &a_key)?;

    for path in [&creds.psk, &creds.other_psk] {
        let mut secret = [0u8; 32];
        openssl::rand::rand_bytes(&mut secret).map_err(ssl)?;
        write(
            path,
            format!("{PSK_USER}:{}\n", hex(&secret)).as_bytes(),
            true,
        )?;
    }
    Ok(creds)
}
