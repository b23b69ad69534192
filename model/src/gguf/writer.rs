//! Streaming GGUF writer (version 3): declare metadata and tensors, write the header, then stream the
//! tensor data in declaration order in chunks of any size. Tensor data is aligned and padded so that
//! [`GgufHeader::parse`](super::GgufHeader::parse) reads back exactly what was declared.

use std::io::{self, Write};

use super::reader::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS};
use super::{GgufError, MetaValue, TensorInfo};
use crate::ggml_type::GgmlType;

/// Name used as the "file" of errors found while declaring tensors.
const WRITER: &str = "<gguf writer>";

/// A streaming GGUF writer over any [`Write`]; wrap files in a `BufWriter` for small chunks.
pub struct GgufWriter<W: Write> {
    out: W,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorInfo>,
    /// Data-section size so far (end of the last declared tensor).
    next_offset: u64,
    header_written: bool,
    /// Tensor whose data is being streamed, and how many of its bytes were written.
    current: usize,
    written_in_current: u64,
    /// Bytes written into the data section so far (data + padding).
    data_pos: u64,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Encodes a value (without its type id); checks that array elements match the array's type.
fn put_value(buf: &mut Vec<u8>, v: &MetaValue, key: &str, depth: usize) -> io::Result<()> {
    match v {
        MetaValue::U8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => buf.push(u8::from(*x)),
        MetaValue::String(s) => put_str(buf, s),
        MetaValue::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Array(ty, items) => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(invalid(format!(
                    "metadata key {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
                )));
            }
            buf.extend_from_slice(&ty.id().to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                if item.meta_type() != *ty {
                    return Err(invalid(format!(
                        "metadata key {key:?}: {} element in an array of {ty}",
                        item.meta_type()
                    )));
                }
                put_value(buf, item, key, depth + 1)?;
            }
        }
    }
    Ok(())
}

impl<W: Write> GgufWriter<W> {
    /// A writer of GGUF version 3 whose tensor data is aligned to `alignment` bytes (a power of two;
    /// checked by [`GgufWriter::write_header`]). A non-default alignment is recorded as `general.alignment`.
    pub fn new(out: W, alignment: u64) -> Self {
        GgufWriter {
            out,
            alignment,
            metadata: Vec::new(),
            tensors: Vec::new(),
            next_offset: 0,
            header_written: false,
            current: 0,
            written_in_current: 0,
            data_pos: 0,
        }
    }

    /// Adds a metadata key; a key added twice keeps its first position and takes the new value.
    pub fn add_meta(&mut self, key: &str, value: MetaValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_owned(), value)),
        }
    }

    /// Declares the next tensor and computes its aligned offset in the data section.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType) -> Result<(), GgufError> {
        let err = |what: String| {
            GgufError::new(WRITER, self.next_offset, format!("tensor {name:?}: {what}"))
        };
        if self.header_written {
            return Err(err("declared after the header was written".into()));
        }
        if name.is_empty() {
            return Err(err("empty name".into()));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(err("declared twice".into()));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(err(format!(
                "{} dimensions (valid: 1..={MAX_DIMS})",
                dims.len()
            )));
        }
        if dims.iter().any(|&d| d == 0 || d > i64::MAX as u64) {
            return Err(err(format!("dims {dims:?} must each be 1..=2^63-1")));
        }
        let n = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| err(format!("element count of dims {dims:?} overflows")))?;
        if !dims[0].is_multiple_of(ty.block_size()) {
            return Err(err(format!(
                "row length {} is not a multiple of {ty}'s block size {}",
                dims[0],
                ty.block_size()
            )));
        }
        let bytes = (n / ty.block_size())
            .checked_mul(ty.type_size())
            .ok_or_else(|| err(format!("byte size of dims {dims:?} overflows")))?;
        let align = self.alignment.max(1);
        let offset = self
            .next_offset
            .checked_next_multiple_of(align)
            .and_then(|o| o.checked_add(bytes).map(|end| (o, end)))
            .ok_or_else(|| err("data section size overflows".into()))?;
        self.next_offset = offset.1;
        self.tensors.push(TensorInfo {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty,
            offset: offset.0,
            bytes,
        });
        Ok(())
    }

    /// The tensors declared so far, with their offsets and sizes.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Writes magic, version, counts, metadata, tensor infos and the padding up to the data section.
    pub fn write_header(&mut self) -> io::Result<()> {
        if self.header_written {
            return Err(invalid("GGUF header written twice".into()));
        }
        let a = self.alignment;
        if a == 0 || !a.is_power_of_two() || a > u32::MAX as u64 {
            return Err(invalid(format!(
                "alignment {a} is not a power of two that fits in u32"
            )));
        }
        match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some((_, MetaValue::U32(v))) if u64::from(*v) == a => {}
            Some((_, v)) => {
                return Err(invalid(format!(
                    "{ALIGNMENT_KEY} is {v:?} but the writer aligns to {a}"
                )))
            }
            None if a != DEFAULT_ALIGNMENT => {
                self.add_meta(ALIGNMENT_KEY, MetaValue::U32(a as u32))
            }
            None => {}
        }
        let mut buf = Vec::with_capacity(1 << 16);
        buf.extend_from_slice(&GGUF_MAGIC);
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        buf.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            if k.is_empty() {
                return Err(invalid("empty metadata key".into()));
            }
            put_str(&mut buf, k);
            buf.extend_from_slice(&v.meta_type().id().to_le_bytes());
            put_value(&mut buf, v, k, 0)?;
        }
        for t in &self.tensors {
            put_str(&mut buf, &t.name);
            buf.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                buf.extend_from_slice(&d.to_le_bytes());
            }
            buf.extend_from_slice(&t.ty.id().to_le_bytes());
            buf.extend_from_slice(&t.offset.to_le_bytes());
        }
        self.out.write_all(&buf)?;
        // Stream the padding: a large alignment must not become a large allocation.
        let len = buf.len() as u64;
        self.write_zeros(len.next_multiple_of(a) - len)?;
        self.header_written = true;
        Ok(())
    }

    fn write_zeros(&mut self, mut n: u64) -> io::Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.out.write_all(&ZEROS[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Pads the data section with zeros up to data-relative position `target`.
    fn pad_to(&mut self, target: u64) -> io::Result<()> {
        if target > self.data_pos {
            self.write_zeros(target - self.data_pos)?;
            self.data_pos = target;
        }
        Ok(())
    }

    /// Streams tensor data: the declared tensors' bytes in declaration order, in chunks of any size.
    /// Padding between tensors is inserted automatically. More bytes than declared is an error.
    pub fn write_tensor_data(&mut self, mut chunk: &[u8]) -> io::Result<()> {
        if !self.header_written {
            return Err(invalid("tensor data written before the header".into()));
        }
        while !chunk.is_empty() {
            let Some(t) = self.tensors.get(self.current) else {
                return Err(invalid(format!(
                    "{} bytes of tensor data beyond the {} declared tensors",
                    chunk.len(),
                    self.tensors.len()
                )));
            };
            let (start, size) = (t.offset, t.bytes);
            if self.written_in_current == 0 {
                self.pad_to(start)?;
            }
            let n = (size - self.written_in_current).min(chunk.len() as u64) as usize;
            self.out.write_all(&chunk[..n])?;
            chunk = &chunk[n..];
            self.written_in_current += n as u64;
            self.data_pos += n as u64;
            if self.written_in_current == size {
                self.current += 1;
                self.written_in_current = 0;
            }
        }
        Ok(())
    }

    /// Checks that all tensor data was written, pads the file to the alignment, flushes and returns the
    /// output. Writes the header first if it was not written (a file with no tensors).
    pub fn finish(mut self) -> io::Result<W> {
        if !self.header_written {
            self.write_header()?;
        }
        if let Some(t) = self.tensors.get(self.current) {
            return Err(invalid(format!(
                "tensor data missing: tensor {:?} has {} of {} bytes ({} tensors declared, {} complete)",
                t.name,
                self.written_in_current,
                t.bytes,
                self.tensors.len(),
                self.current
            )));
        }
        let end = self.data_pos.next_multiple_of(self.alignment);
        self.pad_to(end)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Writes a whole GGUF (header and every tensor's data) into a byte vector; for tests and small files.
pub fn write_to_vec(
    alignment: u64,
    metadata: &[(String, MetaValue)],
    tensors: &[(&str, &[u64], GgmlType, &[u8])],
) -> io::Result<Vec<u8>> {
    let mut w = GgufWriter::new(Vec::new(), alignment);
    for (k, v) in metadata {
        w.add_meta(k, v.clone());
    }
    for (name, dims, ty, _) in tensors {
        w.add_tensor(name, dims, *ty)
            .map_err(|e| invalid(e.to_string()))?;
    }
    w.write_header()?;
    for ((name, _, _, data), t) in tensors.iter().zip(w.tensors.clone()) {
        if data.len() as u64 != t.bytes {
            return Err(invalid(format!(
                "tensor {name:?}: {} bytes of data given, {} declared",
                data.len(),
                t.bytes
            )));
        }
        w.write_tensor_data(data)?;
    }
    w.finish()
}
