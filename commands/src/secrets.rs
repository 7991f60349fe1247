//! Secrets at rest and random tokens.
//!
//! TOTP secrets are sealed with XChaCha20-Poly1305 under a key derived from
//! `LEDGER_SECRET_KEY`, bound to their owner (the user id is the associated
//! data), so a row copied to another user does not decrypt. Refresh tokens,
//! API keys carry 256 random bits and recovery codes 100 (one use each,
//! behind the login throttle) and are stored
//! as SHA-256 hashes: with that much entropy a slow hash adds nothing.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
#[error("a sealed secret could not be opened (wrong LEDGER_SECRET_KEY or altered data)")]
pub struct SealError;

/// Seals and opens secrets with the service's secret key.
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl SecretBox {
    /// Derives the cipher key from the configured secret (any length; the
    /// configuration requires at least 32 bytes).
    pub fn new(secret_key: &[u8]) -> SecretBox {
        let mut hasher = Sha256::new();
        hasher.update(b"ledger secret box v1\0");
        hasher.update(secret_key);
        let key = hasher.finalize();
        SecretBox { cipher: XChaCha20Poly1305::new(&key) }
    }

    /// A box with a raw 32-byte key (a user's personal-data key).
    pub fn from_key(key: &[u8; 32]) -> SecretBox {
        SecretBox { cipher: XChaCha20Poly1305::new(key.into()) }
    }

    /// nonce || ciphertext+tag.
    pub fn seal(&self, owner: Uuid, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: owner.as_bytes() })
            .map_err(|_| SealError)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn open(&self, owner: Uuid, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() <= NONCE_LEN {
            return Err(SealError);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: owner.as_bytes() })
            .map_err(|_| SealError)
    }
}

/// `n` random bytes from the OS-seeded CSPRNG.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes
}

/// A random token as lower-case base32 without padding.
pub fn random_token(bytes: usize) -> String {
    data_encoding::BASE32_NOPAD.encode(&random_bytes(bytes)).to_ascii_lowercase()
}

/// The stored form of a high-entropy token.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_the_same_key_and_owner() {
        let a = SecretBox::new(b"one secret key, at least 32 bytes long");
        let b = SecretBox::new(b"another secret key, also 32 bytes long");
        let owner = Uuid::new_v4();
        let sealed = a.seal(owner, b"totp secret").unwrap();
        assert!(!sealed.windows(11).any(|w| w == b"totp secret"), "ciphertext hides the plaintext");
        assert_eq!(a.open(owner, &sealed).unwrap(), b"totp secret");
        assert!(b.open(owner, &sealed).is_err());
        assert!(a.open(Uuid::new_v4(), &sealed).is_err());
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(a.open(owner, &altered).is_err());
    }

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let t = random_token(32);
        assert_eq!(t.len(), 52);
        assert_ne!(t, random_token(32));
        assert_eq!(token_hash(&t), token_hash(&t));
        assert_eq!(token_hash(&t).len(), 32);
    }
}
