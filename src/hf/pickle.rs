//! A bounded, non-executing reader for the pickles inside `torch.save` zips (`ckpt.pt`).
//!
//! A pickle is a program for a small stack machine; Python's unpickler runs it and may call any
//! function it names. This reader runs the same opcodes over plain values and never calls
//! anything: a `GLOBAL` outside [`allowed`] is refused where it appears, before the rest of
//! the file is read. It is written for untrusted files:
//! - every length in the file is checked against the bytes that remain before anything is
//!   allocated;
//! - values nest at most [`MAX_DEPTH`] deep, so walking or dropping them cannot overflow the
//!   stack;
//! - memo gets and puts copy values (no shared or cyclic structure); the nodes copied over the
//!   whole file are bounded by [`work_budget`] of its size, so a few hundred bytes cannot
//!   expand into gigabytes ("billion laughs");
//! - tensors are read from the zip only through [`TorchZip::read_tensor`], which checks the
//!   shape, strides and storage bounds first.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A pickled value, as the opcodes built it.
#[derive(Debug, Clone, PartialEq)]
pub enum Pickled {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Pickled>),
    List(Vec<Pickled>),
    /// dict and collections.OrderedDict, items in file order.
    Dict(Vec<(Pickled, Pickled)>),
    Global { module: String, name: String },
    /// `callable(*args)` (REDUCE and NEWOBJ), never called.
    Reduce { callable: Box<Pickled>, args: Box<Pickled> },
    /// `obj.__setstate__(state)` (BUILD), never called.
    Build { obj: Box<Pickled>, state: Box<Pickled> },
    /// A persistent id: how torch.save refers to a tensor's storage.
    PersistentId(Box<Pickled>),
}

/// How deep values may nest (torch.save's state dicts need about 6).
pub const MAX_DEPTH: u32 = 64;

/// Value nodes a pickle of `len` bytes may create and copy in all: 64 per byte, plus slack.
pub fn work_budget(len: usize) -> u64 {
    64 * len as u64 + (1 << 16)
}

/// Functions and classes a pickle of tensors and plain values may name.
pub fn allowed(module: &str, name: &str) -> bool {
    match module {
        "torch._utils" => matches!(name, "_rebuild_tensor_v2" | "_rebuild_parameter" | "_rebuild_tensor"),
        "torch" => name.ends_with("Storage"),
        "torch.storage" => name == "UntypedStorage",
        "collections" => name == "OrderedDict",
        _ => false,
    }
}

/// A stack entry: a value, its node count and depth; or a MARK.
enum Slot {
    Mark,
    Val(Pickled, u64, u32),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, (Pickled, u64, u32)>,
    work: u64,
    budget: u64,
}

/// Reads one pickle (up to its STOP opcode). Errors name the problem and the byte offset.
pub fn parse(data: &[u8]) -> std::result::Result<Pickled, String> {
    let mut m = Machine { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), work: 0, budget: work_budget(data.len()) };
    m.run()
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if n > self.data.len() - self.pos {
            return Err(format!("truncated at byte {}: needs {n} more bytes, {} remain", self.pos, self.data.len() - self.pos));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| format!("truncated at byte {}: no end of line", self.pos))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    /// A length read from the file, refused when it exceeds what remains.
    fn len(&mut self, n: u64) -> std::result::Result<usize, String> {
        let remain = (self.data.len() - self.pos) as u64;
        if n > remain {
            return Err(format!("a length of {n} bytes at byte {} exceeds the {remain} that remain", self.pos));
        }
        Ok(n as usize)
    }
    fn charge(&mut self, nodes: u64) -> std::result::Result<(), String> {
        self.work = self.work.saturating_add(nodes);
        if self.work > self.budget {
            return Err(format!(
                "the pickle ({} bytes) expands to more than {} values: refused as a decompression bomb",
                self.data.len(),
                self.budget
            ));
        }
        Ok(())
    }
    fn push(&mut self, v: Pickled) -> std::result::Result<(), String> {
        self.charge(1)?;
        self.stack.push(Slot::Val(v, 1, 1));
        Ok(())
    }
    /// Pushes `value`, a node over children of the given (size, depth).
    fn push_node(&mut self, value: Pickled, children: &[(u64, u32)]) -> std::result::Result<(), String> {
        let size = children.iter().fold(1u64, |a, c| a.saturating_add(c.0));
        let depth = 1 + children.iter().map(|c| c.1).max().unwrap_or(0);
        self.check_depth(depth)?;
        self.charge(1)?;
        self.stack.push(Slot::Val(value, size, depth));
        Ok(())
    }
    /// Pushes a tuple or list of `items`.
    fn push_seq(&mut self, make: fn(Vec<Pickled>) -> Pickled, items: Vec<(Pickled, u64, u32)>) -> std::result::Result<(), String> {
        let meta: Vec<(u64, u32)> = items.iter().map(|c| (c.1, c.2)).collect();
        self.push_node(make(items.into_iter().map(|c| c.0).collect()), &meta)
    }
    /// A length of `width` bytes, then that many bytes (checked against what remains).
    fn counted(&mut self, width: usize) -> std::result::Result<&'a [u8], String> {
        let n = match width {
            1 => self.u8()? as u64,
            4 => self.u32()? as u64,
            _ => self.u64()?,
        };
        let n = self.len(n)?;
        self.take(n)
    }
    fn check_depth(&self, depth: u32) -> std::result::Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("values nest deeper than {MAX_DEPTH} levels at byte {}", self.pos));
        }
        Ok(())
    }
    fn pop(&mut self) -> std::result::Result<(Pickled, u64, u32), String> {
        match self.stack.pop() {
            Some(Slot::Val(v, s, d)) => Ok((v, s, d)),
            Some(Slot::Mark) => Err(format!("a MARK where a value was expected at byte {}", self.pos)),
            None => Err(format!("stack underflow at byte {}", self.pos)),
        }
    }
    fn pop_mark(&mut self) -> std::result::Result<Vec<(Pickled, u64, u32)>, String> {
        let i = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or_else(|| format!("no MARK on the stack at byte {}", self.pos))?;
        let items = self.stack.split_off(i + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|s| match s {
                Slot::Val(v, n, d) => (v, n, d),
                Slot::Mark => unreachable!("the last MARK was found above"),
            })
            .collect())
    }
    /// Adds items to the list or dict on top of the stack.
    fn extend_top(&mut self, items: Vec<(Pickled, u64, u32)>, dict: bool) -> std::result::Result<(), String> {
        let pos = self.pos;
        let add = items.iter().fold(0u64, |a, c| a.saturating_add(c.1));
        let depth = 1 + items.iter().map(|c| c.2).max().unwrap_or(0);
        self.check_depth(depth)?;
        let Some(Slot::Val(top, size, d)) = self.stack.last_mut() else {
            return Err(format!("nothing to add items to at byte {pos}"));
        };
        match (top, dict) {
            (Pickled::List(l), false) => l.extend(items.into_iter().map(|c| c.0)),
            (Pickled::Dict(m), true) => {
                if items.len() % 2 != 0 {
                    return Err(format!("an odd number of dict items at byte {pos}"));
                }
                let mut it = items.into_iter().map(|c| c.0);
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    m.push((k, v));
                }
            }
            (other, _) => {
                return Err(format!("cannot add {} to {} at byte {pos}", if dict { "dict items" } else { "list items" }, kind(other)))
            }
        }
        *size = size.saturating_add(add);
        *d = (*d).max(depth);
        Ok(())
    }
    fn memo_put(&mut self, id: u32) -> std::result::Result<(), String> {
        let Some(Slot::Val(v, n, d)) = self.stack.last() else {
            return Err(format!("nothing to memoize at byte {}", self.pos));
        };
        let (v, n, d) = (v.clone(), *n, *d);
        self.charge(n)?;
        self.memo.insert(id, (v, n, d));
        Ok(())
    }
    fn memo_get(&mut self, id: u32) -> std::result::Result<(), String> {
        let (_, n, d) = self.memo.get(&id).ok_or_else(|| format!("memo entry {id} read before it was written, at byte {}", self.pos))?;
        let (n, d) = (*n, *d);
        // Charged before the copy is made.
        self.charge(n)?;
        let v = self.memo[&id].0.clone();
        self.stack.push(Slot::Val(v, n, d));
        Ok(())
    }

    fn run(&mut self) -> std::result::Result<Pickled, String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint
                }
                b'.' => {
                    // STOP
                    let (v, _, _) = self.pop()?;
                    return Ok(v);
                }
                b'c' => {
                    let (module, name) = (self.line()?, self.line()?);
                    self.global(module, name)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let (name, module) = (self.pop()?.0, self.pop()?.0);
                    match (module, name) {
                        (Pickled::Str(module), Pickled::Str(name)) => self.global(module, name)?,
                        _ => return Err(format!("STACK_GLOBAL needs two strings at byte {at}")),
                    }
                }
                b'N' => self.push(Pickled::None)?,
                0x88 => self.push(Pickled::Bool(true))?,
                0x89 => self.push(Pickled::Bool(false))?,
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Pickled::Int(v))?
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.push(Pickled::Int(u16::from_le_bytes([b[0], b[1]]) as i64))?
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Pickled::Int(v))?
                }
                0x8a => {
                    // LONG1: n little-endian two's-complement bytes
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(format!("an integer of {n} bytes at byte {at} does not fit 64 bits"));
                    }
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // sign
                    }
                    self.push(Pickled::Int(v))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.push(Pickled::Float(v))?
                }
                b'X' | 0x8c | 0x8d => {
                    // BINUNICODE (u32 length), SHORT_BINUNICODE (u8), BINUNICODE8 (u64)
                    let b = self.counted(match op { 0x8c => 1, b'X' => 4, _ => 8 })?;
                    let s = std::str::from_utf8(b).map_err(|_| format!("a string at byte {at} is not UTF-8"))?.to_string();
                    self.push(Pickled::Str(s))?
                }
                b'B' | b'C' | 0x8e => {
                    // BINBYTES (u32), SHORT_BINBYTES (u8), BINBYTES8 (u64)
                    let b = self.counted(match op { b'C' => 1, b'B' => 4, _ => 8 })?.to_vec();
                    self.push(Pickled::Bytes(b))?
                }
                b'(' => self.stack.push(Slot::Mark),
                b')' => self.push(Pickled::Tuple(vec![]))?,
                b']' => self.push(Pickled::List(vec![]))?,
                b'}' => self.push(Pickled::Dict(vec![]))?,
                b't' | b'l' => {
                    let items = self.pop_mark()?;
                    self.push_seq(if op == b't' { Pickled::Tuple } else { Pickled::List }, items)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_seq(Pickled::Tuple, items)?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Pickled::Dict(vec![]))?;
                    self.extend_top(items, true)?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_top(vec![v], false)?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, false)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_top(vec![k, v], true)?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, true)?
                }
                b'q' => {
                    let id = self.u8()? as u32;
                    self.memo_put(id)?
                }
                b'r' => {
                    let id = self.u32()?;
                    self.memo_put(id)?
                }
                0x94 => {
                    // MEMOIZE: the next free index
                    let id = u32::try_from(self.memo.len()).map_err(|_| "too many memo entries".to_string())?;
                    self.memo_put(id)?
                }
                b'h' => {
                    let id = self.u8()? as u32;
                    self.memo_get(id)?
                }
                b'j' => {
                    let id = self.u32()?;
                    self.memo_get(id)?
                }
                b'0' => {
                    self.pop()?; // POP
                }
                b'1' => {
                    self.pop_mark()?; // POP_MARK
                }
                b'2' => {
                    // DUP
                    let Some(Slot::Val(v, n, d)) = self.stack.last() else {
                        return Err(format!("nothing to duplicate at byte {at}"));
                    };
                    let (v, n, d) = (v.clone(), *n, *d);
                    self.charge(n)?;
                    self.stack.push(Slot::Val(v, n, d));
                }
                b'Q' => {
                    let (id, n, d) = self.pop()?;
                    self.push_node(Pickled::PersistentId(Box::new(id)), &[(n, d)])?
                }
                b'R' | 0x81 => {
                    // REDUCE, NEWOBJ: callable(*args), kept as data.
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    if let Pickled::Global { module, name } = &callable.0 {
                        if module == "collections" && name == "OrderedDict" {
                            self.push(Pickled::Dict(vec![]))?;
                            continue;
                        }
                    }
                    let meta = [(callable.1, callable.2), (args.1, args.2)];
                    self.push_node(Pickled::Reduce { callable: Box::new(callable.0), args: Box::new(args.0) }, &meta)?
                }
                b'b' => {
                    // BUILD: a dict's state holds attributes (OrderedDict's _metadata), not items.
                    let state = self.pop()?;
                    let obj = self.pop()?;
                    if let Pickled::Dict(_) = obj.0 {
                        self.stack.push(Slot::Val(obj.0, obj.1, obj.2));
                        continue;
                    }
                    let meta = [(obj.1, obj.2), (state.1, state.2)];
                    self.push_node(Pickled::Build { obj: Box::new(obj.0), state: Box::new(state.0) }, &meta)?
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {at}")),
            }
        }
    }

    fn global(&mut self, module: String, name: String) -> std::result::Result<(), String> {
        if !allowed(&module, &name) {
            return Err(format!("refusing to load: the pickle references {module}.{name}, which is neither a tensor nor a plain value"));
        }
        self.push(Pickled::Global { module, name })
    }
}

fn kind(v: &Pickled) -> &'static str {
    match v {
        Pickled::None => "None",
        Pickled::Bool(_) => "a bool",
        Pickled::Int(_) => "an int",
        Pickled::Float(_) => "a float",
        Pickled::Str(_) => "a string",
        Pickled::Bytes(_) => "bytes",
        Pickled::Tuple(_) => "a tuple",
        Pickled::List(_) => "a list",
        Pickled::Dict(_) => "a dict",
        Pickled::Global { .. } => "a class",
        Pickled::Reduce { .. } => "an object",
        Pickled::Build { .. } => "an object",
        Pickled::PersistentId(_) => "a storage",
    }
}

impl Pickled {
    /// The value for `key` in a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&Pickled> {
        match self {
            Pickled::Dict(kv) => kv.iter().find(|(k, _)| matches!(k, Pickled::Str(s) if s == key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A plain value (None, bool, int, float, string) as JSON.
    pub fn to_json(&self) -> Option<serde_json::Value> {
        Some(match self {
            Pickled::None => serde_json::Value::Null,
            Pickled::Bool(b) => serde_json::Value::Bool(*b),
            Pickled::Int(i) => serde_json::Value::from(*i),
            Pickled::Float(f) => serde_json::Value::from(*f),
            Pickled::Str(s) => serde_json::Value::String(s.clone()),
            _ => return None,
        })
    }
}

/// Where a pickled tensor's data is: `torch._utils._rebuild_tensor_v2(storage, offset, size,
/// stride, ...)` over `('storage', torch.XStorage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub dtype: DType,
    /// The storage's entry name under the archive's `data/` folder.
    pub key: String,
    /// Offset into the storage, in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
    /// The storage's length, in elements.
    pub storage_len: usize,
}

fn usize_of(v: &Pickled) -> Option<usize> {
    match v {
        Pickled::Int(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

fn usizes(v: &Pickled) -> Option<Vec<usize>> {
    match v {
        Pickled::Tuple(items) | Pickled::List(items) => items.iter().map(usize_of).collect(),
        _ => None,
    }
}

impl TensorRef {
    /// The tensor a state-dict value describes: `None` if it is not a tensor, an error naming
    /// what is wrong if it is a malformed one.
    pub fn from_pickled(v: &Pickled) -> Option<std::result::Result<TensorRef, String>> {
        let Pickled::Reduce { callable, args } = v else { return None };
        let Pickled::Global { module, name } = callable.as_ref() else { return None };
        if module != "torch._utils" {
            return None;
        }
        let Pickled::Tuple(args) = args.as_ref() else { return Some(Err("its arguments are not a tuple".into())) };
        match name.as_str() {
            // A Parameter wraps the tensor: (tensor, requires_grad, hooks).
            "_rebuild_parameter" => match args.first() {
                Some(inner) => TensorRef::from_pickled(inner).or(Some(Err("a parameter holds no tensor".into()))),
                None => Some(Err("a parameter without arguments".into())),
            },
            "_rebuild_tensor_v2" | "_rebuild_tensor" => Some(Self::from_args(args)),
            _ => None,
        }
    }

    fn from_args(args: &[Pickled]) -> std::result::Result<TensorRef, String> {
        let [storage, offset, size, stride, ..] = args else {
            return Err(format!("tensor arguments: expected at least 4, got {}", args.len()));
        };
        let Pickled::PersistentId(id) = storage else { return Err("the tensor's storage is not a persistent id".into()) };
        let Pickled::Tuple(id) = id.as_ref() else { return Err("the storage id is not a tuple".into()) };
        let [Pickled::Str(tag), Pickled::Global { name: class, .. }, Pickled::Str(key), _location, numel, ..] = id.as_slice() else {
            return Err(format!("the storage id is not ('storage', class, key, location, numel): {} items", id.len()));
        };
        if tag != "storage" {
            return Err(format!("unknown persistent id tag {tag:?}"));
        }
        let dtype = match class.as_str() {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "DoubleStorage" => DType::F64,
            other => return Err(format!("unsupported storage type {other} (supported: float32, float16, bfloat16, float64)")),
        };
        let shape = usizes(size).ok_or("the tensor's size is not a tuple of non-negative ints")?;
        let stride = usizes(stride).ok_or("the tensor's stride is not a tuple of non-negative ints")?;
        if shape.len() != stride.len() {
            return Err(format!("size {shape:?} and stride {stride:?} differ in rank"));
        }
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("storage key {key:?} is not a plain name"));
        }
        Ok(TensorRef {
            dtype,
            key: key.clone(),
            offset: usize_of(offset).ok_or("the storage offset is not a non-negative int")?,
            shape,
            stride,
            storage_len: usize_of(numel).ok_or("the storage length is not a non-negative int")?,
        })
    }

    /// The number of elements, if it fits.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }
}

/// A `torch.save` zip: its one pickle, and tensor data read on request.
pub struct TorchZip {
    path: PathBuf,
    zip: zip::ZipArchive<std::io::BufReader<std::fs::File>>,
    /// The archive's folder (`archive/`, or the file's stem in older torch versions).
    prefix: String,
    file_len: u64,
}

impl TorchZip {
    /// Opens the zip and reads its pickle (at most the file's size: torch.save does not
    /// compress it).
    pub fn open(path: &Path) -> Result<(TorchZip, Pickled)> {
        let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::file(path, e))?.len();
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| Error::file(path, format!("not a PyTorch checkpoint (torch.save zip): {e}")))?;
        let pickles: Vec<String> = zip.file_names().filter_map(|n| n.ok()).filter(|n| n.ends_with("data.pkl")).map(|n| n.into_owned()).collect();
        let name = match pickles.as_slice() {
            [one] => one.clone(),
            [] => return Err(Error::file(path, "not a PyTorch checkpoint: no data.pkl inside")),
            more => return Err(Error::file(path, format!("not a PyTorch checkpoint: {} pickles inside ({})", more.len(), more.join(", ")))),
        };
        let prefix = name.strip_suffix("data.pkl").unwrap_or_default().to_string();
        let mut bytes = Vec::new();
        let entry = zip.by_name(&name).map_err(|e| Error::file(path, e))?;
        entry
            .take(file_len + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::file(path, format!("cannot read {name}: {e}")))?;
        if bytes.len() as u64 > file_len {
            return Err(Error::file(path, format!("{name} unpacks to more bytes than the file holds: refused as a decompression bomb")));
        }
        let top = parse(&bytes).map_err(|e| {
            if e.starts_with("refusing") {
                Error::file(path, e)
            } else {
                Error::file(path, format!("unreadable pickle: {e}"))
            }
        })?;
        Ok((TorchZip { path: path.to_path_buf(), zip, prefix, file_len }, top))
    }

    /// The file's size in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Reads a contiguous tensor as f32, after checking its strides and that its storage
    /// entry holds every element it names.
    pub fn read_tensor(&mut self, name: &str, r: &TensorRef, device: &Device) -> Result<Tensor> {
        let bad = |m: String| Error::file(&self.path, format!("tensor {name}: {m}"));
        let numel = r.numel().ok_or_else(|| bad(format!("size {:?} overflows", r.shape)))?;
        let mut expect = 1usize;
        for (&d, &s) in r.shape.iter().zip(&r.stride).rev() {
            if d > 1 && s != expect {
                return Err(bad(format!("size {:?} with stride {:?} is not contiguous", r.shape, r.stride)));
            }
            expect = expect.saturating_mul(d);
        }
        if r.offset.checked_add(numel).is_none_or(|end| end > r.storage_len) {
            return Err(bad(format!("elements {}..{} lie outside its storage of {}", r.offset, r.offset as u128 + numel as u128, r.storage_len)));
        }
        let es = r.dtype.size_in_bytes();
        let entry_name = format!("{}data/{}", self.prefix, r.key);
        let entry = self.zip.by_name(&entry_name).map_err(|e| bad(format!("storage {entry_name}: {e}")))?;
        let need = (r.offset + numel) as u64 * es as u64;
        if entry.size() < need || numel as u64 * es as u64 > self.file_len {
            return Err(bad(format!("storage {entry_name} holds {} bytes, the tensor needs {need}", entry.size())));
        }
        let mut reader = entry;
        std::io::copy(&mut (&mut reader).take((r.offset * es) as u64), &mut std::io::sink()).map_err(|e| bad(e.to_string()))?;
        let mut bytes = vec![0u8; numel * es];
        reader.read_exact(&mut bytes).map_err(|e| bad(format!("storage {entry_name}: {e}")))?;
        let t = match r.dtype {
            DType::F32 => Tensor::from_vec(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect::<Vec<_>>(), r.shape.as_slice(), device)?,
            DType::F64 => Tensor::from_vec(bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8")) as f32).collect::<Vec<_>>(), r.shape.as_slice(), device)?,
            DType::F16 => Tensor::from_vec(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect::<Vec<_>>(), r.shape.as_slice(), device)?,
            DType::BF16 => Tensor::from_vec(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect::<Vec<_>>(), r.shape.as_slice(), device)?,
            other => return Err(bad(format!("unsupported dtype {other:?}"))),
        };
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_and_containers() {
        // pickle.dumps({'a': [1, -2, 300, 70000, 2**40, -(2**40)], 'b': (1.5, True, None, 'x')}, protocol=2)
        let data: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffM,\x01Jp\x11\x01\x00\x8a\x06\x00\x00\x00\x00\x00\x01\x8a\x06\x00\x00\x00\x00\x00\xffeX\x01\x00\x00\x00bq\x03(G?\xf8\x00\x00\x00\x00\x00\x00\x88NX\x01\x00\x00\x00xq\x04tq\x05u.";
        let v = parse(data).unwrap();
        let ints = [1, -2, 300, 70000, 1 << 40, -(1 << 40)].map(Pickled::Int).to_vec();
        assert_eq!(v.get("a"), Some(&Pickled::List(ints)));
        assert_eq!(v.get("b"), Some(&Pickled::Tuple(vec![Pickled::Float(1.5), Pickled::Bool(true), Pickled::None, Pickled::Str("x".into())])));
    }

    #[test]
    fn hostile_pickles_are_refused() {
        // os.system is refused where it is named.
        let e = parse(b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.").unwrap_err();
        assert_eq!(e, "refusing to load: the pickle references posix.system, which is neither a tensor nor a plain value");
        // A string length beyond the file.
        let e = parse(b"\x80\x02X\xff\xff\xff\xffabc.").unwrap_err();
        assert_eq!(e, "a length of 4294967295 bytes at byte 7 exceeds the 4 that remain");
        // Deep nesting: 100 nested lists.
        let mut deep = b"\x80\x02".to_vec();
        deep.extend(std::iter::repeat_n(b']', 100));
        deep.extend(std::iter::repeat_n(b'a', 99));
        deep.push(b'.');
        assert_eq!(parse(&deep).unwrap_err(), "values nest deeper than 64 levels at byte 166");
        // Billion laughs: a list doubled through the memo 40 times.
        let mut laughs = b"\x80\x02]q\x00K\x01a".to_vec();
        for _ in 0..40 {
            laughs.extend(b"h\x00h\x00\x86q\x00");
        }
        laughs.push(b'.');
        let e = parse(&laughs).unwrap_err();
        assert_eq!(e, "the pickle (289 bytes) expands to more than 84032 values: refused as a decompression bomb");
        // Truncation, underflow, stray opcodes.
        assert_eq!(parse(b"\x80\x02K").unwrap_err(), "truncated at byte 3: needs 1 more bytes, 0 remain");
        assert_eq!(parse(b"\x80\x02R.").unwrap_err(), "stack underflow at byte 3");
        assert_eq!(parse(b"\x80\x02\xff").unwrap_err(), "unsupported pickle opcode 0xff at byte 2");
        assert_eq!(parse(b"\x80\x02h\x05.").unwrap_err(), "memo entry 5 read before it was written, at byte 4");
    }

    #[test]
    fn malformed_tensor_arguments_are_errors() {
        let g = |m: &str, n: &str| Pickled::Global { module: m.into(), name: n.into() };
        let reduce = |args: Vec<Pickled>| Pickled::Reduce { callable: Box::new(g("torch._utils", "_rebuild_tensor_v2")), args: Box::new(Pickled::Tuple(args)) };
        assert_eq!(TensorRef::from_pickled(&reduce(vec![Pickled::Int(0)])), Some(Err("tensor arguments: expected at least 4, got 1".into())));
        let storage = |items: Vec<Pickled>| Pickled::PersistentId(Box::new(Pickled::Tuple(items)));
        let ints = |v: &[i64]| Pickled::Tuple(v.iter().map(|&i| Pickled::Int(i)).collect());
        let short = reduce(vec![storage(vec![Pickled::Str("storage".into())]), Pickled::Int(0), ints(&[2]), ints(&[1])]);
        assert_eq!(TensorRef::from_pickled(&short), Some(Err("the storage id is not ('storage', class, key, location, numel): 1 items".into())));
        let good = |key: &str, size: &[i64]| {
            reduce(vec![
                storage(vec![Pickled::Str("storage".into()), g("torch", "FloatStorage"), Pickled::Str(key.into()), Pickled::Str("cpu".into()), Pickled::Int(6)]),
                Pickled::Int(0),
                ints(size),
                ints(&[3, 1]),
            ])
        };
        assert_eq!(
            TensorRef::from_pickled(&good("0", &[2, 3])),
            Some(Ok(TensorRef { dtype: DType::F32, key: "0".into(), offset: 0, shape: vec![2, 3], stride: vec![3, 1], storage_len: 6 }))
        );
        assert_eq!(TensorRef::from_pickled(&good("../x", &[2, 3])), Some(Err("storage key \"../x\" is not a plain name".into())));
        assert_eq!(TensorRef::from_pickled(&good("0", &[2, -3])), Some(Err("the tensor's size is not a tuple of non-negative ints".into())));
        assert_eq!(TensorRef::from_pickled(&Pickled::Int(3)), None);
    }
}
