//! GGUF files: metadata parsed by candle's `gguf_file`, tensor bytes read in place from a
//! memory map so the weights exist once in RAM (the page cache), never copied.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::{Error, Result};

pub use candle_core::quantized::gguf_file::Value as MetaValue;

/// An opened GGUF file: its metadata and a read-only map of its bytes.
pub struct Gguf {
    path: PathBuf,
    content: Content,
    map: Arc<Mmap>,
}

/// A tensor's type, shape (ggml order reversed: rows first) and bytes inside the map.
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: GgmlDType,
    /// Outermost dimension first, as candle reports it: a weight matrix is `[rows, cols]`.
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl Gguf {
    /// Opens and validates a GGUF file: the header must parse and every tensor must lie inside it.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = crate::files::open_regular(path, "a model")?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(Error::NotGguf {
                path: path.to_path_buf(),
                detail: format!("it is only {len} bytes long"),
            });
        }
        // SAFETY: the map is read-only and the file is not expected to change while a model is
        // loaded; this is the same contract llama.cpp's mmap loading relies on.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        if &map[0..4] != b"GGUF" {
            return Err(Error::NotGguf {
                path: path.to_path_buf(),
                detail: "its first bytes are not the GGUF magic".into(),
            });
        }
        let mut cursor = std::io::Cursor::new(&map[..]);
        let content = Content::read(&mut cursor)
            .map_err(|e| header_error(path, &without_backtrace(e).to_string()))?;
        let gguf = Self {
            path: path.to_path_buf(),
            content,
            map: Arc::new(map),
        };
        gguf.check_tensor_extents()?;
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<String> {
        self.get_str("general.architecture")
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(Error::MissingMetadata(format!("the string `{key}`"))),
        }
    }

    /// Any integer-typed value as usize.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        self.get(key)
            .and_then(value_as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| Error::MissingMetadata(format!("the integer `{key}`")))
    }

    /// An array of booleans (or of integers, read as nonzero).
    pub fn get_bool_array(&self, key: &str) -> Result<Vec<bool>> {
        let missing = || Error::MissingMetadata(format!("the array of booleans `{key}`"));
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Bool(b) => Some(*b),
                    v => value_as_u64(v).map(|n| n != 0),
                })
                .collect::<Option<Vec<bool>>>()
                .ok_or_else(missing),
            _ => Err(missing()),
        }
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.get(key) {
            Some(Value::F32(v)) => Ok(*v),
            Some(Value::F64(v)) => Ok(*v as f32),
            Some(v) => value_as_u64(v)
                .map(|v| v as f32)
                .ok_or_else(|| Error::MissingMetadata(format!("the number `{key}`"))),
            None => Err(Error::MissingMetadata(format!("the number `{key}`"))),
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    /// The bytes of a tensor, in place.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let (name, info) = self
            .content
            .tensor_infos
            .get_key_value(name)
            .ok_or_else(|| Error::MissingMetadata(format!("the tensor `{name}`")))?;
        let (start, len) = self.extent(info);
        Ok(TensorView {
            name,
            dtype: info.ggml_dtype,
            shape: info.shape.dims().to_vec(),
            bytes: &self.map[start..start + len],
        })
    }

    /// A weight matrix `[rows, cols]` read in place; `rows` is 1 for a vector.
    pub fn weight(&self, name: &str) -> Result<crate::quant::Weight> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingMetadata(format!("the tensor `{name}`")))?;
        let wtype = crate::quant::WeightType::from_ggml(info.ggml_dtype, name)?;
        let dims = info.shape.dims();
        let cols = *dims.last().unwrap_or(&1);
        let rows = info.shape.elem_count() / cols.max(1);
        let (start, len) = self.extent(info);
        let slice = crate::quant::MapSlice::new(self.map.clone(), start, len);
        crate::quant::Weight::new(name, wtype, rows, cols, slice)
    }

    fn extent(&self, info: &candle_core::quantized::gguf_file::TensorInfo) -> (usize, usize) {
        let elems = info.shape.elem_count();
        let len = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        (
            (self.content.tensor_data_offset + info.offset) as usize,
            len,
        )
    }

    fn check_tensor_extents(&self) -> Result<()> {
        for (name, info) in &self.content.tensor_infos {
            let elems = info.shape.elem_count();
            if elems % info.ggml_dtype.block_size() != 0 {
                return Err(Error::NotGguf {
                    path: self.path.clone(),
                    detail: format!(
                        "tensor `{name}` has {elems} values, not a whole number of {:?} blocks",
                        info.ggml_dtype
                    ),
                });
            }
            let (start, len) = self.extent(info);
            if start + len > self.map.len() {
                return Err(Error::Truncated {
                    path: self.path.clone(),
                    detail: format!(
                        "tensor `{name}` ends at byte {} but the file has {} bytes",
                        start + len,
                        self.map.len()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// candle attaches a backtrace to its errors when `RUST_BACKTRACE` is set; a user needs the
/// message only.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        other => other,
    }
}

/// ggml's names for the type ids candle does not know, so the message names the format.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "an unknown type",
    }
}

fn header_error(path: &Path, message: &str) -> Error {
    if let Some(id) = message.strip_prefix("unknown dtype for tensor ") {
        let id = id.trim();
        return Error::UnsupportedWeightType {
            tensor: "a tensor".into(),
            dtype: format!(
                "{} (ggml type {id})",
                ggml_type_name(id.parse().unwrap_or(u32::MAX))
            ),
        };
    }
    if message.contains("failed to fill whole buffer")
        || message.contains("remaining")
        || message.contains("UnexpectedEof")
        || message.contains("unexpected end")
    {
        return Error::Truncated {
            path: path.to_path_buf(),
            detail: format!("its header is cut off ({message})"),
        };
    }
    Error::NotGguf {
        path: path.to_path_buf(),
        detail: format!("its header does not parse: {message}"),
    }
}

pub(crate) fn value_as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}
