//! Content fingerprint of a model file: what a registry section is keyed by.
//!
//! SHA-256 over, in order: a domain tag, the file size, the header bytes (everything before the data
//! section, which includes metadata and the tensor table), the tensor table as parsed (name, type,
//! dims, offset, size — so two headers that differ only in ways the parser normalises still differ),
//! 64-byte samples at the start, middle and end of every tensor's data, and 64 evenly spaced 4 KiB
//! windows over the data section. Reading costs a few MB even for a 40 GB model, and another file of
//! the same size and layout but different weights gets a different fingerprint.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use pshard_model::gguf::TensorInfo;
use sha2::{Digest, Sha256};

const TAG: &[u8] = b"pshard-fingerprint-v1\0";
const TENSOR_SAMPLE: u64 = 64;
const WINDOWS: u64 = 64;
const WINDOW: u64 = 4096;

/// A model file's fingerprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    /// SHA-256 digest.
    pub sha256: [u8; 32],
    /// Total bytes of the model file(s).
    pub file_size: u64,
}

impl Fingerprint {
    /// Hex of the digest, prefixed `sha256:`.
    pub fn digest_string(&self) -> String {
        let hex: String = self.sha256.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    /// Parses [`Fingerprint::digest_string`] output plus a size.
    pub fn parse(digest: &str, file_size: u64) -> Option<Fingerprint> {
        let hex = digest.strip_prefix("sha256:")?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return None;
        }
        let mut sha256 = [0u8; 32];
        for (i, b) in sha256.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Fingerprint { sha256, file_size })
    }

    /// Fingerprint of one GGUF file, given its data offset and tensor table (from the GGUF reader).
    pub fn of_file(
        path: &Path,
        data_offset: u64,
        tensors: &[TensorInfo],
    ) -> io::Result<Fingerprint> {
        let mut f = File::open(path)?;
        let size = f.metadata()?.len();
        let mut h = Sha256::new();
        h.update(TAG);
        hash_split(&mut h, &mut f, size, data_offset, tensors)?;
        Ok(Fingerprint {
            sha256: h.finalize().into(),
            file_size: size,
        })
    }

    /// Fingerprint of a model split over several files: `(path, data_offset, tensors of that split)`.
    pub fn of_splits(splits: &[(&Path, u64, &[TensorInfo])]) -> io::Result<Fingerprint> {
        let mut h = Sha256::new();
        h.update(TAG);
        let mut total = 0u64;
        for (path, data_offset, tensors) in splits {
            let mut f = File::open(path)?;
            let size = f.metadata()?.len();
            total += size;
            hash_split(&mut h, &mut f, size, *data_offset, tensors)?;
        }
        Ok(Fingerprint {
            sha256: h.finalize().into(),
            file_size: total,
        })
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", self.digest_string(), self.file_size)
    }
}

fn read_at(f: &mut File, size: u64, off: u64, len: u64, buf: &mut Vec<u8>) -> io::Result<()> {
    let off = off.min(size);
    let len = len.min(size - off);
    buf.resize(len as usize, 0);
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(buf)
}

fn hash_split(
    h: &mut Sha256,
    f: &mut File,
    size: u64,
    data_offset: u64,
    tensors: &[TensorInfo],
) -> io::Result<()> {
    if data_offset > size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("data offset {data_offset} beyond file size {size}"),
        ));
    }
    h.update(size.to_le_bytes());
    let mut buf = Vec::new();
    read_at(f, size, 0, data_offset, &mut buf)?;
    h.update((buf.len() as u64).to_le_bytes());
    h.update(&buf);
    h.update((tensors.len() as u64).to_le_bytes());
    for t in tensors {
        h.update((t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update(t.ty.id().to_le_bytes());
        h.update((t.dims.len() as u64).to_le_bytes());
        for d in &t.dims {
            h.update(d.to_le_bytes());
        }
        h.update(t.offset.to_le_bytes());
        h.update(t.bytes.to_le_bytes());
    }
    for t in tensors {
        let start = data_offset.saturating_add(t.offset);
        for at in [0, t.bytes / 2, t.bytes.saturating_sub(TENSOR_SAMPLE)] {
            read_at(
                f,
                size,
                start.saturating_add(at),
                TENSOR_SAMPLE.min(t.bytes),
                &mut buf,
            )?;
            h.update(&buf);
        }
    }
    let data = size - data_offset;
    for i in 0..WINDOWS {
        let at = data_offset + data / WINDOWS * i;
        read_at(f, size, at, WINDOW, &mut buf)?;
        h.update(&buf);
    }
    Ok(())
}
