//! Certificates made at run time (the lab's, `sluice_lab::pki`), and bcrypt hashes for web
//! configuration files.

pub use sluice_lab::pki::*;

/// A bcrypt hash of `password` (as `htpasswd -B` makes), for web configuration files.
pub fn bcrypt_hash(password: &str) -> String {
    bcrypt::hash(password, 6).expect("bcrypt")
}
