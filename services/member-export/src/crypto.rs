//! Profiles at rest: AES-256-GCM (the `aes-gcm` crate), one key per key id, a random 96-bit
//! nonce per value, and the member id as associated data, so a stored profile cannot be
//! moved to another member's row and still decrypt. A stored value is `nonce ‖ ciphertext`;
//! its key id is stored beside it.

use std::collections::BTreeMap;

use aes_gcm::{
    Aes256Gcm, Nonce,
    aead::{Aead as _, AeadCore as _, KeyInit as _, OsRng, Payload},
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use secrecy::ExposeSecret as _;

use crate::config::{DEVELOPMENT_KEY_ID, EncryptionSettings};

const NONCE_BYTES: usize = 12;

/// Encrypts and decrypts profiles; see the module docs.
pub struct ProfileCipher {
    current: String,
    keys: BTreeMap<String, Aes256Gcm>,
}

impl std::fmt::Debug for ProfileCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileCipher")
            .field("current", &self.current)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A value that could not be decrypted: an unknown key id, or a value that was changed or
/// belongs to another member.
#[derive(Debug, thiserror::Error)]
#[error("a stored profile cannot be decrypted with key {key_id:?}")]
pub struct Undecryptable {
    /// The key id stored beside the value.
    pub key_id: String,
}

impl ProfileCipher {
    /// The cipher `settings` describe.
    ///
    /// # Errors
    /// When a key is not base64 of 32 bytes or `current` names no key (the message names the
    /// key id, never the key).
    pub fn new(settings: &EncryptionSettings) -> anyhow::Result<Self> {
        let mut keys = BTreeMap::new();
        for (id, key) in &settings.keys {
            let bytes = STANDARD
                .decode(key.expose_secret().trim())
                .ok()
                .filter(|bytes| bytes.len() == 32)
                .ok_or_else(|| anyhow::anyhow!("encryption.keys.{id} is not base64 of 32 bytes"))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| anyhow::anyhow!("encryption.keys.{id} is not a 256-bit key"))?;
            keys.insert(id.clone(), cipher);
        }
        anyhow::ensure!(
            keys.contains_key(&settings.current),
            "encryption.current names {:?}, which is not in encryption.keys",
            settings.current
        );
        if settings.current == DEVELOPMENT_KEY_ID {
            tracing::warn!(
                "profiles are encrypted with the built-in development key; set encryption.keys \
                 and encryption.current from a secret outside local runs"
            );
        }
        Ok(Self {
            current: settings.current.clone(),
            keys,
        })
    }

    /// The key id new profiles are sealed under.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// Encrypts `plaintext` for `member_id` with the current key: (key id, stored value).
    pub fn encrypt(&self, member_id: &str, plaintext: &[u8]) -> (String, Vec<u8>) {
        let cipher = &self.keys[&self.current];
        // From the operating system's CSPRNG: a nonce must never repeat under one key.
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        // AES-GCM over a slice held in memory cannot fail (only lengths beyond 64 GiB do).
        let mut sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: member_id.as_bytes(),
                },
            )
            .expect("AES-GCM encrypts any in-memory profile");
        let mut stored = nonce.to_vec();
        stored.append(&mut sealed);
        (self.current.clone(), stored)
    }

    /// Decrypts a value stored for `member_id` with `key_id`.
    ///
    /// # Errors
    /// [`Undecryptable`] for an unknown key id or a value that does not authenticate.
    pub fn decrypt(
        &self,
        member_id: &str,
        key_id: &str,
        stored: &[u8],
    ) -> Result<Vec<u8>, Undecryptable> {
        let undecryptable = || Undecryptable {
            key_id: key_id.to_owned(),
        };
        let cipher = self.keys.get(key_id).ok_or_else(undecryptable)?;
        if stored.len() < NONCE_BYTES {
            return Err(undecryptable());
        }
        let (nonce, sealed) = stored.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| undecryptable())?;
        cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: member_id.as_bytes(),
                },
            )
            .map_err(|_| undecryptable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_decrypts_only_for_its_member_and_key() {
        let cipher = ProfileCipher::new(&EncryptionSettings::default()).expect("valid");
        let (key_id, stored) = cipher.encrypt("M-1", b"kim@example.com");
        assert!(
            !stored
                .windows(b"kim@example.com".len())
                .any(|w| w == b"kim@example.com"),
            "stored in the clear"
        );
        assert_eq!(
            cipher.decrypt("M-1", &key_id, &stored).expect("decrypts"),
            b"kim@example.com"
        );
        assert!(
            cipher.decrypt("M-2", &key_id, &stored).is_err(),
            "moved to another member's row"
        );
        assert!(cipher.decrypt("M-1", "retired", &stored).is_err());
        let mut changed = stored.clone();
        *changed.last_mut().expect("non-empty") ^= 1;
        assert!(cipher.decrypt("M-1", &key_id, &changed).is_err());
        // A fresh nonce each time: the same profile never looks the same twice.
        assert_ne!(cipher.encrypt("M-1", b"kim@example.com").1, stored);
    }

    #[test]
    fn malformed_keys_are_refused_without_echoing_them() {
        let mut settings = EncryptionSettings::default();
        settings
            .keys
            .insert("short".into(), secrecy::SecretString::from("c2hvcnQta2V5"));
        let error = ProfileCipher::new(&settings).expect_err("16 bytes is not a key");
        assert!(
            error.to_string().contains("encryption.keys.short"),
            "{error}"
        );
        assert!(!error.to_string().contains("c2hvcnQta2V5"), "{error}");
        settings.keys.remove("short");
        settings.current = "missing".into();
        assert!(ProfileCipher::new(&settings).is_err());
    }
}
