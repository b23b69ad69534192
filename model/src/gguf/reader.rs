//! Validating GGUF parser over a byte slice.
//!
//! [`GgufHeader::parse`] checks everything before it allocates or trusts it: magic, version, counts
//! against the bytes that remain, string lengths, array nesting, type ids, dimensions (checked
//! arithmetic), alignment, and that the tensors' data tiles the data section: every tensor inside the
//! file, none overlapping another, and no byte between or after them but alignment padding.
//! Every failure is a [`GgufError`] naming the file, the byte offset and what was wrong.

use std::collections::HashSet;

use super::{MetaType, MetaValue, TensorInfo};
use crate::ggml_type::GgmlType;

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when the file has no `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Key that overrides the data alignment (a `u32`, power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Most dimensions a tensor may have (ggml's limit).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (arrays of arrays of ...); real files use at most 2.
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Most metadata array elements accepted in one file, all arrays together. Each parsed value takes
/// 32 bytes of memory, so without a cap a file of 1-byte array elements could demand 32x its size;
/// real files hold under 2 million (vocabulary and merges).
pub const MAX_ARRAY_ELEMENTS: u64 = 1 << 24;

/// Smallest encoding of one metadata key/value: key length (8) + type (4) + one byte of value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest encoding of one tensor info: name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// A parsed GGUF header: metadata, tensor table and where the data section starts.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor table in file order.
    pub tensors: Vec<TensorInfo>,
    /// `general.alignment` (default 32).
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

/// An error reading a GGUF file: the file, the byte offset and what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: at byte {offset}: {what}")]
pub struct GgufError {
    /// File name.
    pub file: String,
    /// Byte offset where the problem was found.
    pub offset: u64,
    /// What was wrong.
    pub what: String,
}

impl GgufError {
    /// An error about `file` at byte `offset`.
    pub fn new(file: &str, offset: u64, what: impl Into<String>) -> GgufError {
        GgufError {
            file: file.to_string(),
            offset,
            what: what.into(),
        }
    }
}

impl MetaType {
    /// Maps a GGUF metadata type id (0..=12) to a type.
    pub fn from_id(id: u32) -> Option<MetaType> {
        Some(match id {
            0 => MetaType::U8,
            1 => MetaType::I8,
            2 => MetaType::U16,
            3 => MetaType::I16,
            4 => MetaType::U32,
            5 => MetaType::I32,
            6 => MetaType::F32,
            7 => MetaType::Bool,
            8 => MetaType::String,
            9 => MetaType::Array,
            10 => MetaType::U64,
            11 => MetaType::I64,
            12 => MetaType::F64,
            _ => return None,
        })
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Lower-case name, e.g. `"u32"`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            MetaType::U8 => "u8",
            MetaType::I8 => "i8",
            MetaType::U16 => "u16",
            MetaType::I16 => "i16",
            MetaType::U32 => "u32",
            MetaType::I32 => "i32",
            MetaType::F32 => "f32",
            MetaType::Bool => "bool",
            MetaType::String => "string",
            MetaType::Array => "array",
            MetaType::U64 => "u64",
            MetaType::I64 => "i64",
            MetaType::F64 => "f64",
        }
    }

    /// Fewest bytes one value of this type occupies in a file (an empty string or array included).
    pub fn min_encoded_size(self) -> u64 {
        match self {
            MetaType::U8 | MetaType::I8 | MetaType::Bool => 1,
            MetaType::U16 | MetaType::I16 => 2,
            MetaType::U32 | MetaType::I32 | MetaType::F32 => 4,
            MetaType::U64 | MetaType::I64 | MetaType::F64 => 8,
            MetaType::String => 8,
            MetaType::Array => 4 + 8,
        }
    }
}

impl std::fmt::Display for MetaType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl MetaValue {
    /// The value's type.
    pub fn meta_type(&self) -> MetaType {
        match self {
            MetaValue::U8(_) => MetaType::U8,
            MetaValue::I8(_) => MetaType::I8,
            MetaValue::U16(_) => MetaType::U16,
            MetaValue::I16(_) => MetaType::I16,
            MetaValue::U32(_) => MetaType::U32,
            MetaValue::I32(_) => MetaType::I32,
            MetaValue::F32(_) => MetaType::F32,
            MetaValue::Bool(_) => MetaType::Bool,
            MetaValue::String(_) => MetaType::String,
            MetaValue::Array(..) => MetaType::Array,
            MetaValue::U64(_) => MetaType::U64,
            MetaValue::I64(_) => MetaType::I64,
            MetaValue::F64(_) => MetaType::F64,
        }
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer type whose value is non-negative, as `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits in `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// `F32`, `F64` (rounded) or any integer type, as `f32`.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => self
                .as_i64()
                .map(|v| v as f32)
                .or_else(|| self.as_u64().map(|v| v as f32)),
        }
    }

    /// The boolean, if this is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// Element type and elements, if this is an array.
    pub fn as_array(&self) -> Option<(MetaType, &[MetaValue])> {
        match self {
            MetaValue::Array(t, v) => Some((*t, v.as_slice())),
            _ => None,
        }
    }
}

/// A bounds-checked little-endian reader; every read names what it was reading in its error.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a str,
    /// Array elements read so far, against [`MAX_ARRAY_ELEMENTS`].
    array_elements: u64,
}

impl<'a> Cursor<'a> {
    fn err(&self, offset: usize, what: impl Into<String>) -> GgufError {
        GgufError::new(self.file, offset as u64, what)
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn std::fmt::Display) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.err(
                self.pos,
                format!(
                    "truncated: {what} needs {n} bytes but only {} remain in the file",
                    self.remaining()
                ),
            ));
        }
        let start = self.pos;
        // n <= remaining <= usize::MAX, so the cast is exact.
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(
        &mut self,
        what: &dyn std::fmt::Display,
    ) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn std::fmt::Display) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn std::fmt::Display) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed byte string; the length is checked against the bytes that remain.
    fn string(&mut self, what: &dyn std::fmt::Display) -> Result<&'a [u8], GgufError> {
        let at = self.pos;
        let len = self.u64(&format_args!("length of {what}"))?;
        if len > self.remaining() {
            return Err(self.err(
                at,
                format!(
                    "string length {len} of {what} exceeds the {} bytes left in the file",
                    self.remaining()
                ),
            ));
        }
        self.take(len, what)
    }

    /// A count of items each at least `min_size` bytes, rejected when the rest of the file cannot hold them.
    fn count(&mut self, min_size: u64, what: &dyn std::fmt::Display) -> Result<u64, GgufError> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = self.remaining() / min_size.max(1);
        if n > fits {
            return Err(self.err(
                at,
                format!(
                    "{what} is {n}, but the {} bytes left in the file hold at most {fits} (truncated or corrupt file)",
                    self.remaining()
                ),
            ));
        }
        Ok(n)
    }

    fn value(&mut self, ty: MetaType, depth: usize, key: &str) -> Result<MetaValue, GgufError> {
        let what = format_args!("value of metadata key {key:?}");
        Ok(match ty {
            MetaType::U8 => MetaValue::U8(u8::from_le_bytes(self.array(&what)?)),
            MetaType::I8 => MetaValue::I8(i8::from_le_bytes(self.array(&what)?)),
            MetaType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            MetaType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            MetaType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            MetaType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            MetaType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            MetaType::U64 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            MetaType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            MetaType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            MetaType::Bool => {
                let at = self.pos;
                match self.array::<1>(&what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        return Err(self.err(
                            at,
                            format!("metadata key {key:?}: bool byte is {b}, not 0 or 1"),
                        ))
                    }
                }
            }
            MetaType::String => {
                let s = self.string(&what)?;
                // Values are UTF-8 by the spec, but some converters wrote raw token bytes; keep those
                // files loadable (keys and tensor names, which we match on, are checked strictly).
                MetaValue::String(match std::str::from_utf8(s) {
                    Ok(s) => s.to_owned(),
                    Err(_) => String::from_utf8_lossy(s).into_owned(),
                })
            }
            MetaType::Array => {
                let at = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(
                        at,
                        format!("metadata key {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"),
                    ));
                }
                let tid = self.u32(&format_args!("array element type of metadata key {key:?}"))?;
                let Some(elem) = MetaType::from_id(tid) else {
                    return Err(self.err(
                        at,
                        format!("metadata key {key:?}: unknown array element type id {tid} (valid: 0..=12)"),
                    ));
                };
                let n = self.count(
                    elem.min_encoded_size(),
                    &format_args!("element count of {elem} array {key:?}"),
                )?;
                self.array_elements += n; // n <= file size: no overflow
                if self.array_elements > MAX_ARRAY_ELEMENTS {
                    return Err(self.err(
                        at + 4,
                        format!("metadata key {key:?}: more than {MAX_ARRAY_ELEMENTS} array elements in the file"),
                    ));
                }
                // `count` bounded n by the remaining bytes and the budget above bounds the total.
                let mut values = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    values.push(self.value(elem, depth + 1, key)?);
                }
                MetaValue::Array(elem, values)
            }
        })
    }
}

/// Checks that the tensors tile the data section: in offset order, the first starts at 0 and each
/// next one where the previous one ends, rounded up to the alignment, and the file ends after the
/// last one's data plus at most its padding. Every byte of the data section then belongs to a
/// tensor or to alignment padding, so a tensor whose type or shape was changed to a smaller one
/// (leaving a gap) or a larger one (overlapping the next) is caught, as is data no tensor claims.
/// Every range was checked to lie inside the file before, so no sum here overflows.
fn check_tiling(
    c: &Cursor<'_>,
    tensors: &[TensorInfo],
    offset_fields: &[usize],
    data_offset: u64,
    alignment: u64,
) -> Result<(), GgufError> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    // Where the next tensor must start (relative to the data section) and who ends there.
    let mut next = 0u64;
    let mut prev: Option<&TensorInfo> = None;
    for &i in &order {
        let t = &tensors[i];
        if t.offset != next {
            let what = match prev {
                Some(a) if t.offset < next => format!(
                    "tensor {:?} (data offset {}) overlaps tensor {:?} (data offset {}, {} bytes)",
                    t.name, t.offset, a.name, a.offset, a.bytes
                ),
                Some(a) => format!(
                    "tensor {:?} starts at data offset {}, but tensor {:?} ends at {} (next aligned start {next}): \
                     {} bytes of the data section belong to no tensor (a tensor's type or shape is wrong, or the file is corrupt)",
                    t.name,
                    t.offset,
                    a.name,
                    a.offset + a.bytes,
                    t.offset - next
                ),
                None => format!(
                    "tensor {:?} starts at data offset {}: the first {} bytes of the data section belong to no tensor",
                    t.name, t.offset, t.offset
                ),
            };
            return Err(c.err(offset_fields[i], what));
        }
        let end = t.offset + t.bytes;
        next = end.div_ceil(alignment) * alignment;
        prev = Some(t);
    }
    let file_len = c.bytes.len() as u64;
    if let Some(last) = prev {
        let end = data_offset + last.offset + last.bytes;
        let padded = data_offset + next;
        if file_len > padded {
            return Err(c.err(
                end as usize,
                format!(
                    "{} bytes after the last tensor's data (tensor {:?} ends at byte {end}, its padding at {padded}) belong to no tensor \
                     (a tensor's type or shape is wrong, or the file is corrupt)",
                    file_len - padded,
                    last.name
                ),
            ));
        }
    } else if file_len > data_offset {
        return Err(c.err(
            data_offset as usize,
            format!(
                "the file has no tensors but {} bytes of tensor data",
                file_len - data_offset
            ),
        ));
    }
    Ok(())
}

fn utf8<'a>(c: &Cursor<'_>, at: usize, bytes: &'a [u8], what: &str) -> Result<&'a str, GgufError> {
    std::str::from_utf8(bytes).map_err(|e| c.err(at, format!("{what} is not valid UTF-8 ({e})")))
}

impl GgufHeader {
    /// Parses and validates a GGUF header from a whole file's bytes; `file` names the file in errors.
    ///
    /// Never panics and never reads out of bounds; every tensor's data range is checked to lie inside
    /// `bytes`, aligned, and the ranges to tile the data section (see [`check_tiling`]).
    pub fn parse(bytes: &[u8], file: &str) -> Result<GgufHeader, GgufError> {
        let mut c = Cursor {
            bytes,
            pos: 0,
            file,
            array_elements: 0,
        };
        let magic = c.array::<4>(&"GGUF magic")?;
        if magic != GGUF_MAGIC {
            return Err(c.err(
                0,
                format!(
                    "bad magic {:?} (expected \"GGUF\"): not a GGUF file",
                    String::from_utf8_lossy(&magic)
                ),
            ));
        }
        let version = c.u32(&"version")?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(c.err(
                    4,
                    "GGUF version 1 is not supported (it used 32-bit counts); re-convert the model with a current llama.cpp",
                ))
            }
            v if (1..=3).contains(&v.swap_bytes()) => {
                return Err(c.err(4, format!("big-endian GGUF (version {}) is not supported", v.swap_bytes())))
            }
            v => return Err(c.err(4, format!("unsupported GGUF version {v} (supported: 2 and 3)"))),
        }
        let n_tensors = c.count(MIN_TENSOR_INFO_BYTES, &"tensor count")?;
        let n_kv = c.count(MIN_KV_BYTES, &"metadata key/value count")?;
        // Both tables share the rest of the file.
        let need = n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES; // each term <= file size
        if need > c.remaining() {
            return Err(c.err(
                8,
                format!(
                    "{n_tensors} tensors and {n_kv} metadata keys need at least {need} bytes, but only {} remain",
                    c.remaining()
                ),
            ));
        }

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut keys: HashSet<&[u8]> = HashSet::with_capacity(n_kv as usize);
        let mut alignment = DEFAULT_ALIGNMENT;
        for i in 0..n_kv {
            let at = c.pos;
            let kb = c.string(&format_args!("metadata key #{i}"))?;
            let key = utf8(&c, at, kb, &format!("metadata key #{i}"))?;
            if key.is_empty() {
                return Err(c.err(at, format!("metadata key #{i} is empty")));
            }
            if !keys.insert(kb) {
                return Err(c.err(at, format!("duplicate metadata key {key:?}")));
            }
            let tat = c.pos;
            let tid = c.u32(&format_args!("type of metadata key {key:?}"))?;
            let Some(ty) = MetaType::from_id(tid) else {
                return Err(c.err(
                    tat,
                    format!("metadata key {key:?}: unknown value type id {tid} (valid: 0..=12)"),
                ));
            };
            let vat = c.pos;
            let value = c.value(ty, 0, key)?;
            if key == ALIGNMENT_KEY {
                alignment = match value {
                    MetaValue::U32(a) if a != 0 && a.is_power_of_two() => a.into(),
                    MetaValue::U32(a) => {
                        return Err(c.err(
                            vat,
                            format!("{ALIGNMENT_KEY} is {a}, not a non-zero power of two"),
                        ))
                    }
                    ref v => {
                        return Err(c.err(
                            tat,
                            format!("{ALIGNMENT_KEY} has type {}, expected u32", v.meta_type()),
                        ))
                    }
                };
            }
            metadata.push((key.to_owned(), value));
        }

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        // Where each tensor's offset field lies, for errors found after the table is read.
        let mut offset_fields = Vec::with_capacity(n_tensors as usize);
        let mut names: HashSet<&[u8]> = HashSet::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let at = c.pos;
            let nb = c.string(&format_args!("name of tensor #{i}"))?;
            let name = utf8(&c, at, nb, &format!("name of tensor #{i}"))?;
            if name.is_empty() {
                return Err(c.err(at, format!("tensor #{i} has an empty name")));
            }
            if !names.insert(nb) {
                return Err(c.err(at, format!("duplicate tensor name {name:?}")));
            }
            let dat = c.pos;
            let n_dims = c.u32(&format_args!("n_dims of tensor {name:?}"))?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(c.err(
                    dat,
                    format!("tensor {name:?} has {n_dims} dimensions (valid: 1..={MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                let at = c.pos;
                let v = c.u64(&format_args!("dimension {d} of tensor {name:?}"))?;
                // ggml stores dims as int64; an empty tensor has no use in a model and no data to check.
                if v == 0 || v > i64::MAX as u64 {
                    return Err(c.err(
                        at,
                        format!("tensor {name:?}: dimension {d} is {v} (must be 1..=2^63-1)"),
                    ));
                }
                dims.push(v);
            }
            let tat = c.pos;
            let tid = c.u32(&format_args!("type of tensor {name:?}"))?;
            let ty =
                GgmlType::from_id(tid).map_err(|e| c.err(tat, format!("tensor {name:?}: {e}")))?;
            let oat = c.pos;
            let offset = c.u64(&format_args!("data offset of tensor {name:?}"))?;

            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| {
                    c.err(
                        dat,
                        format!("tensor {name:?}: element count of dims {dims:?} overflows"),
                    )
                })?;
            // Quant blocks run along rows, so the row length must be whole blocks.
            if !dims[0].is_multiple_of(ty.block_size()) {
                return Err(c.err(
                    dat,
                    format!(
                        "tensor {name:?}: row length {} is not a multiple of {ty}'s block size {}",
                        dims[0],
                        ty.block_size()
                    ),
                ));
            }
            let bytes = (n_elements / ty.block_size())
                .checked_mul(ty.type_size())
                .ok_or_else(|| {
                    c.err(
                        dat,
                        format!("tensor {name:?}: byte size of dims {dims:?} as {ty} overflows"),
                    )
                })?;
            tensors.push(TensorInfo {
                name: name.to_owned(),
                dims,
                ty,
                offset,
                bytes,
            });
            offset_fields.push(oat);
        }

        let header_end = c.pos as u64;
        let data_offset = header_end.div_ceil(alignment) * alignment; // header_end <= file size: no overflow
        let file_len = bytes.len() as u64;
        for (t, &oat) in tensors.iter().zip(&offset_fields) {
            if !t.offset.is_multiple_of(alignment) {
                return Err(c.err(
                    oat,
                    format!("tensor {:?}: data offset {} is not a multiple of the alignment {alignment}", t.name, t.offset),
                ));
            }
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(c.err(
                        oat,
                        format!(
                            "tensor {:?}: data at offset {} + {} bytes (data section starts at {data_offset}) extends past the end of the file ({file_len} bytes)",
                            t.name, t.offset, t.bytes
                        ),
                    ))
                }
            }
        }
        check_tiling(&c, &tensors, &offset_fields, data_offset, alignment)?;

        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// Any integer value that is non-negative, as `u64`.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// Any integer value that fits in `i64`.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// An `f32`, `f64` or integer value, as `f32`.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// An array value: element type and elements.
    pub fn get_array(&self, key: &str) -> Option<(MetaType, &[MetaValue])> {
        self.get(key)?.as_array()
    }

    /// Index of the tensor called `name` in [`GgufHeader::tensors`].
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.tensors.iter().position(|t| t.name == name)
    }

    /// Absolute byte range of tensor `index` in the file (validated by [`GgufHeader::parse`]).
    pub fn tensor_range(&self, index: usize) -> std::ops::Range<u64> {
        let t = &self.tensors[index];
        let start = self.data_offset + t.offset;
        start..start + t.bytes
    }

    /// The data of tensor `index`, borrowed from `bytes`, which must be the bytes this header was parsed
    /// from (the range was validated against them).
    ///
    /// # Panics
    /// If `index` is out of range or `bytes` is shorter than the file that was parsed (misuse).
    pub fn tensor_data<'a>(&self, bytes: &'a [u8], index: usize) -> &'a [u8] {
        let r = self.tensor_range(index);
        &bytes[r.start as usize..r.end as usize]
    }
}
