//! Why a weight transfer or one of its chunks was refused.

/// Why a transfer or a chunk was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RelayError {
    /// The source sent another version than the one asked for.
    #[error("the source sent version {got}, version {want} was asked for")]
    WrongVersion {
        /// Asked for.
        want: u64,
        /// Received.
        got: u64,
    },
    /// The chunk's data does not match its CRC32.
    #[error("chunk at byte {offset} fails its CRC32 check")]
    CorruptChunk {
        /// Where the chunk starts.
        offset: u64,
    },
    /// The chunk does not start where the transfer stands.
    #[error("chunk at byte {got}, but {want} bytes are held")]
    WrongOffset {
        /// The byte the transfer reached.
        want: u64,
        /// The chunk's offset.
        got: u64,
    },
    /// The chunk's size, checksum or manifest differ from what earlier chunks said.
    #[error("version {version}: {what} differs from the first source's")]
    Mismatch {
        /// The version.
        version: u64,
        /// Which header field.
        what: &'static str,
    },
    /// The finished blob fails its whole-blob CRC32, or its manifest is unusable.
    #[error("version {version}: {reason}")]
    Corrupt {
        /// The version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// The transfer was given up (a newer version superseded it).
    #[error("version {0} was given up")]
    Abandoned(u64),
    /// No source delivered the whole blob.
    #[error("version {version}: no source delivered it ({last})")]
    Exhausted {
        /// The version.
        version: u64,
        /// The last failure.
        last: String,
    },
}
