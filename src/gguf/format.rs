//! The GGUF container (version 3, as llama.cpp's `gguf.h` / `docs/gguf.md` define it),
//! read and written. Little-endian throughout:
//!
//! ```text
//! "GGUF" u32:version u64:n_tensors u64:n_kv
//! n_kv x (string:key u32:type value)            string = u64:len bytes
//! n_tensors x (string:name u32:n_dims u64[n_dims]:ne u32:ggml_type u64:offset)
//! padding to general.alignment (32), then the tensor data (each at its offset, aligned)
//! ```
//!
//! `ne` lists dimensions innermost first (ne[0] is the row length), the reverse of torch's
//! shape. Reading never trusts a size: every length is checked against the bytes left
//! before anything is allocated, and every tensor must lie inside the file.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::quant::QKind;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: usize = 32;
/// More dimensions than this is not a GGML tensor.
const MAX_DIMS: usize = 4;

/// The tensor types nanomoe reads and writes (GGML type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q(QKind),
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q(QKind::Q4_0),
            8 => GgmlType::Q(QKind::Q8_0),
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q(QKind::Q4_0) => 2,
            GgmlType::Q(QKind::Q8_0) => 8,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q(k) => k.name(),
        }
    }

    /// Bytes of a tensor of `ne` (None when a row is not whole blocks, or on overflow).
    pub fn bytes(self, ne: &[u64]) -> Option<u64> {
        let n = ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        match self {
            GgmlType::F32 => n.checked_mul(4),
            GgmlType::F16 | GgmlType::BF16 => n.checked_mul(2),
            GgmlType::Q(k) => {
                let row = *ne.first()?;
                if row % crate::quant::BLOCK as u64 != 0 {
                    return None;
                }
                (n / crate::quant::BLOCK as u64).checked_mul(k.block_bytes() as u64)
            }
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and the elements (all of that type).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// An integer value of any width (negative ones excluded).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn strings(items: impl IntoIterator<Item = String>) -> Value {
        Value::Array(8, items.into_iter().map(Value::Str).collect())
    }
}

/// One tensor's entry: name, dimensions (innermost first), type, offset in the data section.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in torch's order (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A GGUF file, memory-mapped: its metadata, tensor entries, and where the data starts.
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub map: Arc<memmap2::Mmap>,
    pub data_start: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.b.len() - self.pos) as u64;
        if n > left {
            return Err(Error::Input(format!("truncated: {what} needs {n} bytes at offset {}, {left} left", self.pos)));
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::Input(format!("{what} is not valid UTF-8")))
    }
    fn left(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        let what = &format!("the value of {key}");
        Ok(match ty {
            0 => Value::U8(self.take(1, what)?[0]),
            1 => Value::I8(self.take(1, what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2"))),
            3 => Value::I16(i16::from_le_bytes(self.take(2, what)?.try_into().expect("2"))),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.take(1, what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(Error::Input(format!("{key}: a bool must be 0 or 1, got {b}"))),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 0 {
                    return Err(Error::Input(format!("{key}: arrays of arrays are not supported")));
                }
                let et = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count beyond the bytes left is a lie.
                let min = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => return Err(Error::Input(format!("{key}: unknown array element type {et}"))),
                };
                if n.checked_mul(min).is_none_or(|b| b > self.left()) {
                    return Err(Error::Input(format!("truncated: {key} claims {n} elements, more than the {} bytes left hold", self.left())));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(et, key, depth + 1)?);
                }
                Value::Array(et, items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => return Err(Error::Input(format!("{key}: unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Opens and checks a GGUF file (errors name the file).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        // SAFETY: read-only map; a file changed underneath gives wrong values, not unsafety.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(path, e))?;
        Self::parse(Arc::new(map)).map_err(|e| match e {
            Error::Input(m) => Error::file(path, format!("not a valid GGUF file: {m}")),
            e => e,
        })
    }

    /// Parses a mapped file.
    pub fn parse(map: Arc<memmap2::Mmap>) -> Result<Self> {
        let b: &[u8] = &map;
        let mut r = Reader { b, pos: 0 };
        let magic = r.take(4, "the magic")?;
        if magic != MAGIC {
            return Err(Error::Input(format!("wrong magic {:?} (expected \"GGUF\")", String::from_utf8_lossy(magic))));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::Input(format!("unsupported version {version} (nanomoe reads 2 and 3)")));
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        // A key-value pair takes at least 13 bytes, a tensor entry at least 24.
        if n_kv.checked_mul(13).is_none_or(|n| n > r.left()) || n_tensors.checked_mul(24).is_none_or(|n| n > r.left()) {
            return Err(Error::Input(format!("truncated: {n_tensors} tensors and {n_kv} metadata entries claimed, {} bytes left", r.left())));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = r.string("a metadata key")?;
            let ty = r.u32("a metadata type")?;
            let v = r.value(ty, &key, 0)?;
            if metadata.iter().any(|(k, _): &(String, Value)| *k == key) {
                return Err(Error::Input(format!("metadata key {key} appears twice")));
            }
            metadata.push((key, v));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => return Err(Error::Input(format!("general.alignment must be a power of two, got {v:?}"))),
            },
            None => DEFAULT_ALIGNMENT,
        };
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for _ in 0..n_tensors {
            let name = r.string("a tensor name")?;
            let nd = r.u32("a tensor's dimension count")? as usize;
            if nd == 0 || nd > MAX_DIMS {
                return Err(Error::Input(format!("tensor {name} has {nd} dimensions (1 to {MAX_DIMS} allowed)")));
            }
            let mut ne = Vec::with_capacity(nd);
            for _ in 0..nd {
                ne.push(r.u64("a tensor dimension")?);
            }
            let tid = r.u32("a tensor type")?;
            let ty = GgmlType::from_id(tid)
                .ok_or_else(|| Error::Input(format!("tensor {name} has GGML type {tid}; nanomoe reads f32, f16, bf16, q8_0 and q4_0")))?;
            let offset = r.u64("a tensor offset")?;
            if offset % alignment as u64 != 0 {
                return Err(Error::Input(format!("tensor {name} starts at offset {offset}, not a multiple of the alignment {alignment}")));
            }
            if !names.insert(name.clone()) {
                return Err(Error::Input(format!("tensor {name} appears twice")));
            }
            tensors.push(TensorInfo { name, ne, ty, offset });
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let data_len = (b.len() as u64).saturating_sub(data_start as u64);
        for t in &tensors {
            let size = t.ty.bytes(&t.ne).ok_or_else(|| {
                Error::Input(format!("tensor {} of {} {:?}: its rows are not whole blocks, or its size overflows", t.name, t.ty.name(), t.shape()))
            })?;
            if t.offset.checked_add(size).is_none_or(|end| end > data_len) {
                return Err(Error::Input(format!(
                    "tensor {} ({} bytes at offset {}) lies past the end of the data ({data_len} bytes)",
                    t.name, size, t.offset
                )));
            }
        }
        Ok(GgufFile { version, metadata, tensors, data_start, map })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The bytes of a tensor (checked to lie inside the file when parsed).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let start = self.data_start + t.offset as usize;
        let size = t.ty.bytes(&t.ne).expect("checked when parsed") as usize;
        &self.map[start..start + size]
    }

    /// Drops the mapped pages that hold only this tensor's bytes (after they were copied
    /// out): memory then holds one copy of a dense tensor, not two. Read again, the pages
    /// come back from the file.
    pub fn release(&self, t: &TensorInfo) {
        let (start, len) = self.range(t);
        self.release_range(start, len);
    }

    /// Drops the mapped pages that lie wholly inside bytes start..start+len.
    pub fn release_range(&self, start: usize, len: usize) {
        let page = 4096;
        let (a, b) = (start.div_ceil(page) * page, (start + len) / page * page);
        if b > a {
            // SAFETY: a read-only private map; dropped pages are re-read from the file.
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
        }
    }

    /// Byte range of a tensor in the file.
    pub fn range(&self, t: &TensorInfo) -> (usize, usize) {
        let start = self.data_start + t.offset as usize;
        (start, t.ty.bytes(&t.ne).expect("checked when parsed") as usize)
    }
}

/// A tensor to write: name, shape (torch order), type, and its bytes in that type.
pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

fn put_value(w: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => w.push(*x),
        Value::I8(x) => w.push(*x as u8),
        Value::U16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => w.push(*x as u8),
        Value::Str(s) => put_str(w, s),
        Value::Array(et, items) => {
            w.extend_from_slice(&et.to_le_bytes());
            w.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(w, i);
            }
        }
        Value::U64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => w.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Writes a GGUF v3 file: to a temporary name beside `path`, renamed into place when
/// complete (never a half-written file).
pub fn write(path: &Path, metadata: &[(String, Value)], tensors: &[OutTensor]) -> Result<()> {
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut head, k);
        head.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut head, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset += (t.data.len() as u64).div_ceil(DEFAULT_ALIGNMENT as u64) * DEFAULT_ALIGNMENT as u64;
    }
    head.resize(head.len().div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT, 0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.partial", path.file_name().and_then(|n| n.to_str()).unwrap_or("model.gguf")));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        f.write_all(&head)?;
        for t in tensors {
            f.write_all(&t.data)?;
            let pad = t.data.len().div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT - t.data.len();
            f.write_all(&vec![0u8; pad])?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))
}
