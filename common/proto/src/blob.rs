//! Weights on the wire: one version as a contiguous byte blob plus a manifest, the form
//! in which the learner publishes, relays forward and actors receive a policy.
//! (`quill_model::weights` converts tensors to and from it.)

use serde::{Deserialize, Serialize};

/// Where one tensor sits in a [`WeightBlob`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Hugging Face tensor name.
    pub name: String,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Byte offset in the blob.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

/// One version of the weights, serialised.
#[derive(Debug, Clone)]
pub struct WeightBlob {
    /// The policy version these weights are.
    pub version: u64,
    /// The tensors' layout.
    pub manifest: Vec<ManifestEntry>,
    /// The raw little-endian tensor bytes, back to back.
    pub bytes: Vec<u8>,
    /// CRC32 of `bytes`.
    pub crc32: u32,
}

/// Why a blob cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BlobError {
    /// The bytes do not match the blob's CRC32.
    #[error("weights v{version}: checksum mismatch")]
    Checksum {
        /// The blob's version.
        version: u64,
    },
    /// The blob is not the one the learner published: its SHA-256 differs from the
    /// digest the learner announced (whoever relayed it).
    #[error("weights v{version}: SHA-256 {got} differs from the learner's digest {expected}")]
    Digest {
        /// The blob's version.
        version: u64,
        /// The digest of what arrived, in hex.
        got: String,
        /// The learner's digest, in hex.
        expected: String,
    },
    /// A manifest entry names a dtype the format does not carry.
    #[error("weights v{version}: unknown weight dtype `{dtype}` in manifest")]
    UnknownDtype {
        /// The blob's version.
        version: u64,
        /// The dtype given.
        dtype: String,
    },
    /// A manifest entry's length or offset does not fit its shape or the blob.
    #[error("weights v{version}: entry `{name}` does not fit the blob")]
    EntryOutOfBounds {
        /// The blob's version.
        version: u64,
        /// The tensor's name.
        name: String,
    },
}

/// Bytes as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes per element of a manifest dtype, `None` for a dtype the format does not carry.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    match dtype {
        "f32" => Some(4),
        "bf16" | "f16" => Some(2),
        _ => None,
    }
}

impl WeightBlob {
    /// SHA-256 over the version, the manifest and the bytes: the digest the learner
    /// announces for each version it publishes.
    pub fn sha256(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let manifest = serde_json::to_vec(&self.manifest).expect("a manifest serialises");
        let mut hasher = Sha256::new();
        hasher.update(self.version.to_le_bytes());
        hasher.update((manifest.len() as u64).to_le_bytes());
        hasher.update(&manifest);
        hasher.update(&self.bytes);
        hasher.finalize().into()
    }

    /// Checks the blob against the digest the learner announced for its version.
    pub fn check_digest(&self, expected: &[u8]) -> Result<(), BlobError> {
        let got = self.sha256();
        if got.as_slice() == expected {
            return Ok(());
        }
        Err(BlobError::Digest {
            version: self.version,
            got: hex(&got),
            expected: hex(expected),
        })
    }

    /// Checks a received blob against its manifest and checksum.
    pub fn verify(&self) -> Result<(), BlobError> {
        let version = self.version;
        if crc32fast::hash(&self.bytes) != self.crc32 {
            return Err(BlobError::Checksum { version });
        }
        for entry in &self.manifest {
            let size = dtype_size(&entry.dtype).ok_or_else(|| BlobError::UnknownDtype {
                version,
                dtype: entry.dtype.clone(),
            })?;
            let numel: i64 = entry.shape.iter().product();
            let fits = u64::try_from(numel)
                .ok()
                .and_then(|n| n.checked_mul(size))
                .is_some_and(|want| entry.len == want)
                && entry
                    .offset
                    .checked_add(entry.len)
                    .is_some_and(|end| end <= self.bytes.len() as u64);
            if !fits {
                return Err(BlobError::EntryOutOfBounds {
                    version,
                    name: entry.name.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob() -> WeightBlob {
        let bytes = vec![7u8; 12];
        WeightBlob {
            version: 3,
            manifest: vec![
                ManifestEntry {
                    name: "a".into(),
                    dtype: "f32".into(),
                    shape: vec![2],
                    offset: 0,
                    len: 8,
                },
                ManifestEntry {
                    name: "b".into(),
                    dtype: "bf16".into(),
                    shape: vec![2],
                    offset: 8,
                    len: 4,
                },
            ],
            crc32: crc32fast::hash(&bytes),
            bytes,
        }
    }

    #[test]
    fn verify_finds_corrupt_bytes_and_entries_that_do_not_fit() {
        assert_eq!(blob().verify(), Ok(()));
        let mut bad = blob();
        bad.bytes[0] ^= 1;
        assert_eq!(bad.verify(), Err(BlobError::Checksum { version: 3 }));
        let mut bad = blob();
        bad.manifest[1].len += 2;
        assert!(bad
            .verify()
            .unwrap_err()
            .to_string()
            .contains("`b` does not fit"));
        let mut bad = blob();
        bad.manifest[0].offset = u64::MAX;
        assert!(matches!(
            bad.verify(),
            Err(BlobError::EntryOutOfBounds { .. })
        ));
        let mut bad = blob();
        bad.manifest[0].dtype = "i8".into();
        assert!(bad.verify().unwrap_err().to_string().contains("`i8`"));
    }

    #[test]
    fn the_digest_covers_version_manifest_and_bytes() {
        let digest = blob().sha256();
        assert_eq!(blob().check_digest(&digest), Ok(()));
        // A relay that forges the bytes and their CRC32 passes `verify` but not the digest.
        let mut forged = blob();
        forged.bytes[3] ^= 0x40;
        forged.crc32 = crc32fast::hash(&forged.bytes);
        assert_eq!(forged.verify(), Ok(()));
        let err = forged.check_digest(&digest).unwrap_err().to_string();
        assert!(err.contains("differs from the learner's digest"), "{err}");
        let mut renamed = blob();
        renamed.manifest[0].name = "c".into();
        assert!(renamed.check_digest(&digest).is_err());
        let mut older = blob();
        older.version = 2;
        assert!(older.check_digest(&digest).is_err());
        assert!(blob().check_digest(&[]).is_err());
    }
}
