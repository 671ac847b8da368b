//! GGUF files: the header is parsed here, every size, offset and count it declares checked
//! against the file before use, and tensor bytes are read in place from a memory map so the
//! weights exist once in RAM (the page cache), never copied.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::{Error, Result};

pub use candle_core::quantized::gguf_file::Value as MetaValue;

/// An opened GGUF file: its metadata and a read-only map of its bytes.
pub struct Gguf {
    path: PathBuf,
    metadata: HashMap<String, Value>,
    tensors: HashMap<String, TensorInfo>,
    map: Arc<Mmap>,
}

/// A tensor as the header declares it, its extent already checked to lie inside the map.
struct TensorInfo {
    dtype: GgmlDType,
    /// Outermost dimension first.
    shape: Vec<usize>,
    elems: usize,
    start: usize,
    len: usize,
}

/// A tensor's type, shape (ggml order reversed: rows first) and bytes inside the map.
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: GgmlDType,
    /// Outermost dimension first: a weight matrix is `[rows, cols]`.
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl Gguf {
    /// Opens and validates a GGUF file: the header must parse, and every tensor must lie inside
    /// the file, whole blocks of its type, overlapping no other.
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
        let (metadata, tensors) = Header::new(path, &map).read()?;
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            tensors,
            map: Arc::new(map),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<String> {
        self.get_str("general.architecture")
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
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
            .and_then(|v| usize::try_from(v).ok())
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
        self.tensors.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The bytes of a tensor, in place.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let (name, info) = self
            .tensors
            .get_key_value(name)
            .ok_or_else(|| Error::MissingMetadata(format!("the tensor `{name}`")))?;
        Ok(TensorView {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: &self.map[info.start..info.start + info.len],
        })
    }

    /// A weight matrix `[rows, cols]` read in place; `rows` is 1 for a vector.
    pub fn weight(&self, name: &str) -> Result<crate::quant::Weight> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingMetadata(format!("the tensor `{name}`")))?;
        let wtype = crate::quant::WeightType::from_ggml(info.dtype, name)?;
        let cols = *info.shape.last().unwrap_or(&1);
        let rows = info.elems / cols.max(1);
        let slice = crate::quant::MapSlice::new(self.map.clone(), info.start, info.len);
        crate::quant::Weight::new(name, wtype, rows, cols, slice)
    }
}

/// GGUF's alignment of the data section and of each tensor in it when the file names none.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal GGUF but no model uses them; a bound keeps a crafted chain of
/// them from exhausting the stack.
const MAX_NESTING: usize = 8;

/// A cursor over the header bytes. Every read is bounded by the bytes left in the file, so no
/// count or length from the file allocates more than the file itself could hold.
struct Header<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
    /// GGUF v1 wrote lengths and counts as u32, later versions as u64.
    wide: bool,
}

/// A tensor record as read, before its extent is checked.
struct Declared {
    name: String,
    dtype: GgmlDType,
    /// ggml order: innermost (the row) first.
    dims: Vec<u64>,
    offset: u64,
}

impl<'a> Header<'a> {
    fn new(path: &'a Path, bytes: &'a [u8]) -> Self {
        Self {
            path,
            bytes,
            // Past the magic, which `Gguf::open` has checked.
            pos: 4,
            // Until the version says otherwise.
            wide: true,
        }
    }

    fn damaged(&self, detail: String) -> Error {
        Error::Damaged {
            path: self.path.to_path_buf(),
            detail,
        }
    }

    fn read(mut self) -> Result<(HashMap<String, Value>, HashMap<String, TensorInfo>)> {
        let version = self.u32("the version")?;
        self.wide = match version {
            1 => false,
            2 | 3 => true,
            v => {
                return Err(Error::NotGguf {
                    path: self.path.to_path_buf(),
                    detail: format!("it declares GGUF version {v}; longctx reads versions 1 to 3"),
                })
            }
        };
        let width = self.length_width();
        let tensor_count = self.count(width + 4 + 4 + 8, "the tensor count")?;
        let kv_count = self.count(width + 4 + 1, "the metadata count")?;
        let mut metadata = HashMap::new();
        for _ in 0..kv_count {
            let key = self.string("a metadata key")?;
            let ty = self.u32("a metadata type")?;
            let value = self.value(ty, 0, &key)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(self.damaged(format!("it declares the metadata key `{key}` twice")));
            }
        }
        let alignment = self.alignment(&metadata)?;
        let mut declared = Vec::new();
        for _ in 0..tensor_count {
            declared.push(self.tensor_record()?);
        }
        let data_start = u64::try_from(self.pos)
            .ok()
            .and_then(|pos| pos.checked_next_multiple_of(alignment))
            .ok_or_else(|| self.damaged("its header ends past any addressable byte".into()))?;
        let mut tensors = HashMap::new();
        for d in declared {
            let info = self.extent(&d, data_start, alignment)?;
            if tensors.insert(d.name.clone(), info).is_some() {
                return Err(self.damaged(format!("it declares the tensor `{}` twice", d.name)));
            }
        }
        self.check_overlaps(&tensors)?;
        Ok((metadata, tensors))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| Error::Truncated {
                path: self.path.to_path_buf(),
                detail: format!("its header is cut off in {what}"),
            })?;
        let bytes = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.fixed(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.fixed(what).map(u64::from_le_bytes)
    }

    fn length_width(&self) -> usize {
        if self.wide {
            8
        } else {
            4
        }
    }

    fn length(&mut self, what: &str) -> Result<u64> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    /// A count of items taking at least `min_size` bytes each, refused if the rest of the file
    /// could not hold them: callers may then loop or allocate by it.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.length(what)?;
        let left = self.bytes.len() - self.pos;
        let need = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_size).map(|need| (n, need)));
        match need {
            Some((n, need)) if need <= left => Ok(n),
            // A count a file could hold, cut short, is what an interrupted download looks like.
            Some((_, need)) => Err(Error::Truncated {
                path: self.path.to_path_buf(),
                detail: format!(
                    "{what} is {n}, needing at least {need} bytes, but only {left} are left"
                ),
            }),
            None => Err(self.damaged(format!("{what} is {n}, more than any file could hold"))),
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(1, what)?;
        let mut bytes = self.take(len, what)?;
        // Some writers end strings with NULs, which GGUF does not count as text.
        while let [rest @ .., 0] = bytes {
            bytes = rest;
        }
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// The least bytes a value of type `ty` takes, for bounding array lengths.
    fn min_size(&self, ty: u32) -> usize {
        match ty {
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => self.length_width(),
            9 => 4 + self.length_width(),
            _ => 1,
        }
    }

    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<Value> {
        let what = format!("the value of `{key}`");
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.fixed(&what)?)),
            1 => Value::I8(i8::from_le_bytes(self.fixed(&what)?)),
            2 => Value::U16(u16::from_le_bytes(self.fixed(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.fixed(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.fixed(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.fixed(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.fixed(&what)?)),
            7 => match self.fixed::<1>(&what)? {
                [0] => Value::Bool(false),
                [1] => Value::Bool(true),
                [b] => {
                    return Err(self.damaged(format!("`{key}` holds {b} where a bool is 0 or 1")))
                }
            },
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth == MAX_NESTING {
                    return Err(
                        self.damaged(format!("`{key}` nests arrays more than {MAX_NESTING} deep"))
                    );
                }
                let item_ty = self.u32(&what)?;
                let len = self.count(self.min_size(item_ty), &what)?;
                let mut items = Vec::new();
                for _ in 0..len {
                    items.push(self.value(item_ty, depth + 1, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.fixed(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.fixed(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.fixed(&what)?)),
            t => {
                return Err(self.damaged(format!(
                    "`{key}` has value type {t}, which GGUF does not define"
                )))
            }
        })
    }

    /// `general.alignment`: a power of two, as the data section and each tensor offset are
    /// rounded to it; GGUF stores it as a u32.
    fn alignment(&self, metadata: &HashMap<String, Value>) -> Result<u64> {
        match metadata.get("general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(Value::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
            Some(Value::U32(a)) => Err(self.damaged(format!(
                "it declares `general.alignment` = {a}, but an alignment must be a power of two"
            ))),
            Some(other) => Err(self.damaged(format!(
                "it declares `general.alignment` as {:?}, but GGUF stores an alignment as a u32",
                other.value_type()
            ))),
        }
    }

    fn tensor_record(&mut self) -> Result<Declared> {
        let name = self.string("a tensor name")?;
        let what = format!("the record of tensor `{name}`");
        let n_dims = self.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(self.damaged(format!(
                "tensor `{name}` has {n_dims} dimensions, more than ggml's {MAX_DIMS}"
            )));
        }
        let dims = (0..n_dims)
            .map(|_| self.u64(&what))
            .collect::<Result<Vec<_>>>()?;
        let id = self.u32(&what)?;
        let dtype = ggml_dtype(id).ok_or_else(|| Error::UnsupportedWeightType {
            tensor: format!("tensor `{name}`"),
            dtype: format!("{} (ggml type {id})", ggml_type_name(id)),
        })?;
        let offset = self.u64(&what)?;
        Ok(Declared {
            name,
            dtype,
            dims,
            offset,
        })
    }

    /// Where a tensor's bytes lie, from its type's block size and its dims.
    fn extent(&self, d: &Declared, data_start: u64, alignment: u64) -> Result<TensorInfo> {
        let name = &d.name;
        let too_big = || {
            self.damaged(format!(
                "tensor `{name}` declares dimensions {:?}, more values than memory can address",
                d.dims
            ))
        };
        let shape = d
            .dims
            .iter()
            .rev()
            .map(|&n| usize::try_from(n).ok())
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(too_big)?;
        let elems = shape
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .ok_or_else(too_big)?;
        let (block, block_bytes) = (d.dtype.block_size(), d.dtype.type_size());
        let row = shape.last().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return Err(self.damaged(format!(
                "tensor `{name}` has rows of {row} values, not a whole number of {:?} blocks of {block}",
                d.dtype
            )));
        }
        let len = (elems / block)
            .checked_mul(block_bytes)
            .ok_or_else(too_big)?;
        if !d.offset.is_multiple_of(alignment) {
            return Err(self.damaged(format!(
                "tensor `{name}` starts at offset {}, not a multiple of the file's alignment {alignment}",
                d.offset
            )));
        }
        let file_len = self.bytes.len();
        let start = data_start
            .checked_add(d.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| {
                self.damaged(format!(
                    "tensor `{name}` starts at offset {} of the data section, past any addressable byte",
                    d.offset
                ))
            })?;
        let end = start.checked_add(len).ok_or_else(too_big)?;
        // Past the end but addressable is what a cut-off download looks like.
        if end > file_len {
            return Err(Error::Truncated {
                path: self.path.to_path_buf(),
                detail: format!(
                    "tensor `{name}` needs {len} bytes from byte {start} but the file has {file_len} bytes"
                ),
            });
        }
        Ok(TensorInfo {
            dtype: d.dtype,
            shape,
            elems,
            start,
            len,
        })
    }

    /// A tensor whose type or shape was changed reads into its neighbour's bytes.
    fn check_overlaps(&self, tensors: &HashMap<String, TensorInfo>) -> Result<()> {
        let mut by_start: Vec<(&String, &TensorInfo)> =
            tensors.iter().filter(|(_, t)| t.len > 0).collect();
        by_start.sort_by_key(|(name, t)| (t.start, *name));
        for pair in by_start.windows(2) {
            let [(a, ta), (b, tb)] = pair else {
                continue;
            };
            if tb.start < ta.start + ta.len {
                return Err(self.damaged(format!(
                    "tensor `{a}` (bytes {}..{}) overlaps tensor `{b}` (bytes {}..{}); one of them was given a larger type or shape",
                    ta.start,
                    ta.start + ta.len,
                    tb.start,
                    tb.start + tb.len
                )));
            }
        }
        Ok(())
    }
}

/// ggml's type ids for the types candle can size; `GgmlDType::from_u32` is not public.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
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
