//! GGUF: the on-disk format of models. Reader (validating, zero-copy), writer, and split-file models.

pub mod file;
pub mod reader;
pub mod writer;

pub use file::ModelFile;
pub use reader::{GgufError, GgufHeader};
pub use writer::GgufWriter;

use crate::ggml_type::GgmlType;

/// Value types of GGUF metadata (type ids 0..=12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

/// A metadata value. Arrays may nest.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type and values (all of that type).
    Array(MetaType, Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Dimensions in ggml order (`dims[0]` is contiguous).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data relative to the start of the file's data section.
    pub offset: u64,
    /// Bytes of tensor data (checked product of dims, by type).
    pub bytes: u64,
}
