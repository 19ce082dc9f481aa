//! Certificates for the lab and the TLS tests, made at run time (never committed): a CA and the
//! certificates it signs, written as PEM files with the keys at mode 0600.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

/// A certificate and key written to files.
#[derive(Clone, Debug)]
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that signs certificates in `dir`.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub dir: PathBuf,
    /// The CA's certificate (what the other side trusts).
    pub cert: PathBuf,
}

fn write_key(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

impl Ca {
    /// A new CA named `name`, its files in `dir` (created).
    pub fn new(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).expect("pki dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let cert = dir.join(format!("{name}.pem"));
        std::fs::write(&cert, issuer.pem()).expect("write CA");
        Self { issuer, dir: dir.to_owned(), cert }
    }

    /// A certificate for `names` (DNS names, or IP addresses as strings), usable by a server
    /// and a client, valid from yesterday for a year.
    pub fn issue(&self, file: &str, names: &[&str]) -> Files {
        self.issue_with(file, names, |_| {})
    }

    /// One that expired yesterday.
    pub fn issue_expired(&self, file: &str, names: &[&str]) -> Files {
        self.issue_with(file, names, |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    fn issue_with(&self, file: &str, names: &[&str], tweak: impl FnOnce(&mut CertificateParams)) -> Files {
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("names");
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or(file));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_hours(24)).into();
        params.not_after = (now + std::time::Duration::from_hours(365 * 24)).into();
        tweak(&mut params);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let files = Files { cert: self.dir.join(format!("{file}.pem")), key: self.dir.join(format!("{file}-key.pem")) };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        write_key(&files.key, &key.serialize_pem());
        files
    }
}
