//! Session tickets sealed with a key every process on a port shares (`--tls-ticket-key`),
//! so a client resumes whichever process SO_REUSEPORT hands it to.
//!
//! The key is SHA-256 of the file (at least 32 bytes, e.g. `openssl rand 32`), sealing
//! with ChaCha20-Poly1305 from *ring*; a ticket is a random 96-bit nonce and the sealed
//! state. On reload the previous key still opens tickets, so a rotation (write the new file
//! everywhere, SIGHUP every process) drops no resumption.

use std::path::Path;
use std::sync::Mutex;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

use crate::error::Error;

/// Shortest key file accepted.
const MIN_KEY_FILE_BYTES: usize = 32;
/// What clients are told a ticket is good for; rotate the key at least this often.
const LIFETIME_S: u32 = 12 * 3600;

pub struct SharedKey {
    /// The key tickets are sealed with, and the one before it.
    keys: Mutex<(LessSafeKey, Option<LessSafeKey>)>,
    random: SystemRandom,
}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey")
    }
}

fn key_from(path: &Path) -> Result<LessSafeKey, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::config(format!("--tls-ticket-key {}: cannot read it: {e}", path.display())))?;
    if bytes.len() < MIN_KEY_FILE_BYTES {
        return Err(Error::config(format!(
            "--tls-ticket-key {}: {} bytes; use at least {MIN_KEY_FILE_BYTES} random bytes, e.g. `openssl rand 32`",
            path.display(),
            bytes.len()
        )));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let key = UnboundKey::new(&CHACHA20_POLY1305, digest.as_ref()).map_err(|_| Error::config("TLS ticket key: cannot be used"))?;
    Ok(LessSafeKey::new(key))
}

impl SharedKey {
    pub fn load(path: &Path) -> Result<SharedKey, Error> {
        Ok(SharedKey { keys: Mutex::new((key_from(path)?, None)), random: SystemRandom::new() })
    }

    pub fn reload(&self, path: &Path) -> Result<(), Error> {
        let fresh = key_from(path)?;
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut keys.0, fresh);
        keys.1 = Some(old);
        Ok(())
    }
}

impl ProducesTickets for SharedKey {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_S
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.0.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut sealed).ok()?;
        let mut ticket = nonce.to_vec();
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let (nonce, sealed) = ticket.split_at_checked(NONCE_LEN)?;
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for key in std::iter::once(&keys.0).chain(keys.1.as_ref()) {
            let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
            let mut buf = sealed.to_vec();
            if let Ok(plain) = key.open_in_place(nonce, Aad::empty(), &mut buf) {
                let len = plain.len();
                buf.truncate(len);
                return Some(buf);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_with_its_key_and_the_next_one_but_not_another() {
        let dir = std::env::temp_dir().join(format!("pushline-tickets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, [7u8; 32]).unwrap();
        let a = SharedKey::load(&path).unwrap();
        let b = SharedKey::load(&path).unwrap();
        let ticket = a.encrypt(b"state").unwrap();
        assert_eq!(b.decrypt(&ticket).as_deref(), Some(&b"state"[..]), "another process with the same file");
        std::fs::write(&path, [8u8; 32]).unwrap();
        b.reload(&path).unwrap();
        assert_eq!(b.decrypt(&ticket).as_deref(), Some(&b"state"[..]), "the previous key still opens");
        let other = SharedKey::load(&path).unwrap();
        assert_eq!(other.decrypt(&ticket), None);
        assert_eq!(a.decrypt(&ticket[..5]), None, "truncated");
        std::fs::write(&path, [1u8; 8]).unwrap();
        assert!(SharedKey::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
