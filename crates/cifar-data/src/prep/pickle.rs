//! A pickle reader that reads CIFAR's Python batches as data and never runs them.
//!
//! Written by hand because no maintained crate does this job: `serde-pickle` refuses (or replaces
//! with `None`) every global, so it cannot rebuild the numpy array that holds the pixels, and a
//! general unpickler that calls globals is exactly what an untrusted download must not meet.
//! This one is a small stack machine over the opcodes CIFAR's files use (protocols 2 to 4) and
//! an allow-list of four globals, each of which it *interprets* instead of calling:
//! `numpy.core.multiarray._reconstruct` (or `numpy._core…`), `numpy.ndarray`, `numpy.dtype`, and
//! `_codecs.encode` (how Python 3 writes bytes in protocol 2). Anything else — `os.system`, an
//! unknown opcode, a container reached through the memo — is an error.
//!
//! Every length is checked against the bytes that remain before anything is allocated, values
//! nest at most [`MAX_DEPTH`] deep, and containers are owned (never shared), so a hostile file
//! can neither build cycles nor overflow the stack. And everything the machine allocates — each
//! value pushed (one opcode byte makes a value of 40), each memo slot, each mark, each byte
//! string copied or decoded — is charged to a budget of [`BUDGET_PER_BYTE`] times the pickle's
//! length (plus 1 MiB): a small member that asks for gigabytes (a stream of `None`s, a memo
//! index far beyond its contents, one string decoded a thousand times) is an error, not an
//! out-of-memory kill. CIFAR's own pickles use a little over 1× (the pixels are copied once).
use std::rc::Rc;

/// How deep containers may nest. CIFAR needs 3 (the array's state tuple holds a shape tuple).
pub const MAX_DEPTH: usize = 16;

/// Bytes the reader may allocate for each byte of pickle (see the module's doc).
pub const BUDGET_PER_BYTE: usize = 4;

/// A Python value, as far as CIFAR's pickles need.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` or `False`.
    Bool(bool),
    /// An int that fits in 64 bits.
    Int(i64),
    /// Python 2 `str` or Python 3 `bytes`.
    Bytes(Rc<[u8]>),
    /// Python 3 `str` (Python 2 `unicode`).
    Str(Rc<str>),
    /// A tuple.
    Tuple(Vec<Value>, usize),
    /// A list.
    List(Vec<Value>, usize),
    /// A dict, in insertion order.
    Dict(Vec<(Value, Value)>, usize),
    /// One of the allowed globals.
    Global(Global),
    /// A numpy dtype such as `u1`.
    Dtype(Rc<str>),
    /// A numpy array: shape, dtype descr (`u1`, `<f4`, ...) and its bytes in C order.
    Array(Rc<Array>),
}

/// A numpy array rebuilt from `_reconstruct` + `BUILD`.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// The dimensions.
    pub shape: Vec<usize>,
    /// The dtype's descr without byte order: `u1`, `f4`, ...
    pub dtype: String,
    /// The raw elements, row-major.
    pub data: Rc<[u8]>,
}

/// The globals a CIFAR pickle may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `numpy.core.multiarray._reconstruct` or `numpy._core.multiarray._reconstruct`.
    Reconstruct,
    /// `numpy.ndarray`.
    NdArray,
    /// `numpy.dtype`.
    Dtype,
    /// `_codecs.encode`.
    Encode,
}

impl Value {
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(_, d) | Value::List(_, d) | Value::Dict(_, d) => *d,
            _ => 0,
        }
    }

    /// The bytes of a Python 2 `str`, Python 3 `bytes` or `str`.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            Value::Str(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// Looks `key` up in a dict whose keys are `str` or `bytes`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items, _) => {
                items.iter().find(|(k, _)| k.as_bytes() == Some(key.as_bytes())).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    /// A short name of the value's Python type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Bytes(_) => "bytes",
            Value::Str(_) => "str",
            Value::Tuple(..) => "tuple",
            Value::List(..) => "list",
            Value::Dict(..) => "dict",
            Value::Global(_) => "global",
            Value::Dtype(_) => "numpy.dtype",
            Value::Array(_) => "numpy.ndarray",
        }
    }
}

fn container_depth<'a>(items: impl IntoIterator<Item = &'a Value>) -> Result<usize, String> {
    let d = 1 + items.into_iter().map(Value::depth).max().unwrap_or(0);
    if d > MAX_DEPTH {
        return Err(format!("values nest deeper than {MAX_DEPTH} levels"));
    }
    Ok(d)
}

/// Parses one pickle. The error says what is wrong and at which byte offset.
pub fn parse(input: &[u8]) -> Result<Value, String> {
    let budget = input.len().saturating_mul(BUDGET_PER_BYTE).saturating_add(1 << 20);
    Machine { input, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: Vec::new(), budget }.run()
}

/// A stack entry: a value, or a memo slot that holds a container (which we never share).
#[derive(Clone)]
enum Memo {
    Value(Value),
    Container,
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: Vec<Option<Memo>>,
    /// Bytes still allowed to be allocated.
    budget: usize,
}

impl<'a> Machine<'a> {
    /// Charges `bytes` of allocation to the budget.
    fn spend(&mut self, bytes: usize) -> Result<(), String> {
        self.budget = self.budget.checked_sub(bytes).ok_or_else(|| {
            format!(
                "needs more than {BUDGET_PER_BYTE}x its {} bytes of memory (at offset {}): not a CIFAR pickle",
                self.input.len(),
                self.pos
            )
        })?;
        Ok(())
    }

    /// Pushes `v`, charging its slot on the stack.
    fn push(&mut self, v: Value) -> Result<(), String> {
        self.spend(std::mem::size_of::<Value>())?;
        self.stack.push(v);
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.input.len() - self.pos < n {
            return Err(format!("truncated: needs {n} bytes at offset {}", self.pos));
        }
        let s = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()) as usize)
    }

    fn u64(&mut self) -> Result<usize, String> {
        let n = u64::from_le_bytes(self.take(8)?.try_into().unwrap());
        usize::try_from(n).map_err(|_| format!("length {n} too large"))
    }

    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.input[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or("unterminated line")?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| "non-UTF-8 global name".to_string())
    }

    fn pop(&mut self) -> Result<Value, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!("stack underflow at offset {}", self.pos));
        }
        Ok(self.stack.pop().unwrap())
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!("stack underflow at offset {}", self.pos));
        }
        Ok(self.stack.last_mut().unwrap())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self.marks.pop().ok_or("MARK missing")?;
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, idx: usize) -> Result<(), String> {
        let v = self.top()?;
        let entry = match v {
            Value::List(..) | Value::Dict(..) | Value::Tuple(..) => Memo::Container,
            other => Memo::Value(other.clone()),
        };
        // A memo index larger than the input could ever fill is a lie; refuse before growing.
        if idx > self.input.len() {
            return Err(format!("memo index {idx} out of range"));
        }
        if self.memo.len() <= idx {
            self.spend((idx + 1 - self.memo.len()) * std::mem::size_of::<Option<Memo>>())?;
            self.memo.resize(idx + 1, None);
        }
        self.memo[idx] = Some(entry);
        Ok(())
    }

    fn memo_get(&mut self, idx: usize) -> Result<(), String> {
        match self.memo.get(idx).cloned().flatten() {
            Some(Memo::Value(v)) => self.push(v),
            Some(Memo::Container) => {
                Err(format!("memo reference {idx} to a shared container (not used by CIFAR)"))
            }
            None => Err(format!("memo index {idx} was never set")),
        }
    }

    fn push_bytes(&mut self, n: usize) -> Result<(), String> {
        let b = self.take(n)?;
        self.spend(n)?;
        self.push(Value::Bytes(Rc::from(b)))
    }

    fn push_str(&mut self, n: usize) -> Result<(), String> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "invalid UTF-8 in str".to_string())?;
        self.spend(n)?;
        self.push(Value::Str(Rc::from(s)))
    }

    fn push_tuple(&mut self, items: Vec<Value>) -> Result<(), String> {
        let d = container_depth(&items)?;
        self.push(Value::Tuple(items, d))
    }

    fn global(module: &str, name: &str) -> Result<Global, String> {
        match (module, name) {
            ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => Ok(Global::Reconstruct),
            ("numpy", "ndarray") => Ok(Global::NdArray),
            ("numpy", "dtype") => Ok(Global::Dtype),
            ("_codecs", "encode") => Ok(Global::Encode),
            _ => Err(format!("refusing global {module}.{name}: not a CIFAR pickle")),
        }
    }

    fn append(&mut self, new: Vec<Value>) -> Result<(), String> {
        let list = self.top()?;
        let Value::List(items, depth) = list else {
            return Err(format!("APPEND to a {}", list.type_name()));
        };
        *depth = (*depth).max(container_depth(&new)?);
        items.extend(new);
        Ok(())
    }

    fn set_items(&mut self, flat: Vec<Value>) -> Result<(), String> {
        if !flat.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of values".into());
        }
        let dict = self.top()?;
        let Value::Dict(items, depth) = dict else {
            return Err(format!("SETITEM on a {}", dict.type_name()));
        };
        *depth = (*depth).max(container_depth(&flat)?);
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            if !matches!(k, Value::Bytes(_) | Value::Str(_) | Value::Int(_)) {
                return Err(format!("dict key of type {}", k.type_name()));
            }
            items.push((k, v));
        }
        Ok(())
    }

    /// `callable(*args)` for the allowed globals, interpreted rather than called.
    fn reduce(f: Value, args: Value) -> Result<Value, String> {
        let Value::Tuple(args, _) = args else {
            return Err("REDUCE arguments are not a tuple".into());
        };
        match (f, args.as_slice()) {
            (Value::Global(Global::Reconstruct), [Value::Global(Global::NdArray), _, _]) => {
                Ok(Value::Array(Rc::new(Array {
                    shape: vec![0],
                    dtype: String::new(),
                    data: Rc::from(&[][..]),
                })))
            }
            (Value::Global(Global::Dtype), [descr, ..]) => match descr {
                Value::Str(s) => Ok(Value::Dtype(s.clone())),
                Value::Bytes(b) => Ok(Value::Dtype(Rc::from(String::from_utf8_lossy(b).as_ref()))),
                v => Err(format!("numpy.dtype of a {}", v.type_name())),
            },
            (Value::Global(Global::Encode), [Value::Str(s), Value::Str(enc)])
                if enc.as_ref() == "latin1" || enc.as_ref() == "latin-1" =>
            {
                let bytes: Result<Vec<u8>, _> = s.chars().map(|c| u8::try_from(c as u32)).collect();
                bytes
                    .map(|b| Value::Bytes(Rc::from(b)))
                    .map_err(|_| "_codecs.encode of a non-latin1 str".into())
            }
            (f, _) => Err(format!("refusing to call a {} with these arguments", f.type_name())),
        }
    }

    /// `obj.__setstate__(state)` for arrays and dtypes.
    fn build(obj: Value, state: Value) -> Result<Value, String> {
        match (obj, state) {
            (Value::Dtype(descr), Value::Tuple(st, _)) => {
                // (version, byteorder, subarray, names, fields, elsize, alignment, flags)
                let order = st.get(1).and_then(Value::as_bytes).unwrap_or(b"|");
                let order = match order {
                    b"|" | b"=" | b"<" => "",
                    b">" => ">",
                    o => return Err(format!("dtype byte order {:?}", String::from_utf8_lossy(o))),
                };
                if !matches!(st.get(2), None | Some(Value::None)) {
                    return Err("structured or sub-array dtype".into());
                }
                Ok(Value::Dtype(Rc::from(format!("{order}{descr}"))))
            }
            (Value::Array(_), Value::Tuple(st, _)) => {
                let [Value::Int(_), Value::Tuple(shape, _), Value::Dtype(dtype), fortran, data] =
                    st.as_slice()
                else {
                    return Err("numpy array state is not (version, shape, dtype, fortran, data)".into());
                };
                let shape = shape
                    .iter()
                    .map(|d| match d {
                        Value::Int(n) if *n >= 0 => Ok(*n as usize),
                        _ => Err("numpy array shape holds a non-size".to_string()),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if matches!(fortran, Value::Bool(true) | Value::Int(1)) {
                    return Err("Fortran-ordered numpy array".into());
                }
                let data = match data {
                    Value::Bytes(b) => b.clone(),
                    v => return Err(format!("numpy array data is a {}, not bytes", v.type_name())),
                };
                let itemsize = itemsize(dtype).ok_or_else(|| format!("unsupported dtype {dtype}"))?;
                let elements = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                match elements.and_then(|e| e.checked_mul(itemsize)) {
                    Some(n) if n == data.len() => {}
                    _ => {
                        return Err(format!(
                            "numpy array of shape {shape:?} and dtype {dtype} holds {} bytes",
                            data.len()
                        ));
                    }
                }
                Ok(Value::Array(Rc::new(Array { shape, dtype: dtype.to_string(), data })))
            }
            (obj, _) => Err(format!("BUILD on a {}", obj.type_name())),
        }
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.u8().map_err(|_| "ends without STOP".to_string())?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if !(2..=4).contains(&proto) {
                        return Err(format!("pickle protocol {proto} (expected 2 to 4)"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => {
                    let v = self.pop()?;
                    if !self.stack.is_empty() || !self.marks.is_empty() {
                        return Err("values left on the stack at STOP".into());
                    }
                    return Ok(v);
                }
                b'(' => {
                    self.spend(std::mem::size_of::<usize>())?;
                    self.marks.push(self.stack.len());
                }
                b'}' => self.push(Value::Dict(Vec::new(), 1))?,
                b']' => self.push(Value::List(Vec::new(), 1))?,
                b')' => self.push(Value::Tuple(Vec::new(), 1))?,
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64))?;
                }
                b'J' => {
                    let b = self.take(4)?;
                    self.push(Value::Int(i32::from_le_bytes(b.try_into().unwrap()) as i64))?;
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(format!("int of {n} bytes does not fit 64 bits"));
                    }
                    let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 };
                    let mut le = [fill; 8];
                    le[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(le)))?;
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    self.push_bytes(n)?;
                }
                b'T' | b'B' => {
                    let n = self.u32()?;
                    self.push_bytes(n)?;
                }
                0x8e => {
                    let n = self.u64()?;
                    self.push_bytes(n)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    self.push_str(n)?;
                }
                b'X' => {
                    let n = self.u32()?;
                    self.push_str(n)?;
                }
                0x8d => {
                    let n = self.u64()?;
                    self.push_str(n)?;
                }
                b'q' => {
                    let i = self.u8()? as usize;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len();
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as usize;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_tuple(items)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
                    items.reverse();
                    self.push_tuple(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = Self::global(module, name)?;
                    self.push(Value::Global(g))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                        return Err("STACK_GLOBAL of non-strings".into());
                    };
                    let g = Self::global(m, n)?;
                    self.push(Value::Global(g))?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = Self::reduce(f, args)?;
                    // `_codecs.encode` made new bytes (maybe from a memoized str, again and again).
                    if let Value::Bytes(b) = &v {
                        self.spend(b.len())?;
                    }
                    self.push(v)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.pop()?;
                    let v = Self::build(obj, state)?;
                    self.push(v)?;
                }
                op => return Err(format!("unsupported opcode 0x{op:02x} at offset {at}")),
            }
        }
    }
}

/// Bytes per element of a numpy descr, for the dtypes a CIFAR reader may meet.
fn itemsize(descr: &str) -> Option<usize> {
    match descr.trim_start_matches(['<', '>', '|', '=']) {
        "u1" | "i1" | "b1" => Some(1),
        "u2" | "i2" | "f2" => Some(2),
        "u4" | "i4" | "f4" => Some(4),
        "u8" | "i8" | "f8" => Some(8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes Python 2's `pickle.dumps({'labels': [1, 2]}, 2)` writes, by hand.
    fn small_dict() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'U', 6];
        p.extend_from_slice(b"labels");
        p.extend_from_slice(&[b'q', 1, b']', b'q', 2, b'(', b'K', 1, b'K', 2, b'e', b'u', b'.']);
        p
    }

    #[test]
    fn reads_a_py2_dict_of_a_list() {
        let v = parse(&small_dict()).unwrap();
        assert_eq!(v.get("labels"), Some(&Value::List(vec![Value::Int(1), Value::Int(2)], 1)));
    }

    #[test]
    fn refuses_os_system_without_calling_it() {
        let p = b"\x80\x02cos\nsystem\nq\x00U\x04trueq\x01\x85R.";
        let err = parse(p).unwrap_err();
        assert!(err.contains("refusing global os.system"), "{err}");
    }

    #[test]
    fn refuses_unknown_opcodes_and_truncation() {
        assert!(parse(b"\x80\x02\xff.").unwrap_err().contains("unsupported opcode 0xff"));
        let mut p = small_dict();
        p.truncate(p.len() - 3);
        assert!(parse(&p).is_err());
        assert!(parse(b"\x80\x02T\xff\xff\xff\x7f").unwrap_err().contains("truncated"));
    }

    #[test]
    fn a_small_pickle_cannot_demand_much_memory() {
        let budget = |input: &[u8]| input.len() * BUDGET_PER_BYTE + (1 << 20);
        // A mark and 1 MB of `None`s: 40 bytes of value for each byte of pickle.
        let mut nones = vec![0x80, 2, b'('];
        nones.extend(std::iter::repeat_n(b'N', 1 << 20));
        nones.extend([b't', b'.']);
        let err = parse(&nones).unwrap_err();
        assert!(err.contains("needs more than 4x its"), "{err}");
        // A memo index as far as the input reaches, in a pickle long enough to allow it.
        let mut far = vec![0x80, 2, b'N', b'r'];
        let idx = 300_000u32;
        far.extend(idx.to_le_bytes());
        far.extend(std::iter::repeat_n(b'N', idx as usize - far.len() + 8));
        assert!(parse(&far).unwrap_err().contains("needs more than"), "{far:?}");
        // One 100 kB str decoded again and again through the memo: 100 kB of new bytes for 15
        // bytes of pickle each time.
        let mut again = vec![0x80, 2];
        again.extend(b"c_codecs\nencode\nq\x00X");
        again.extend(100_000u32.to_le_bytes());
        again.extend(std::iter::repeat_n(b'a', 100_000));
        again.extend(b"q\x01");
        for _ in 0..1000 {
            again.extend(b"h\x00h\x01X\x06\x00\x00\x00latin1\x86R");
        }
        again.push(b'.');
        assert!(budget(&again) < 2_000_000);
        assert!(parse(&again).unwrap_err().contains("needs more than"), "repeated decoding");
    }

    #[test]
    fn refuses_deep_nesting_and_shared_containers() {
        let mut p = vec![0x80, 2];
        p.extend([b']'; MAX_DEPTH + 2]);
        p.extend([b'a'; MAX_DEPTH + 1]);
        p.push(b'.');
        assert!(parse(&p).unwrap_err().contains("nest deeper"));
        assert!(parse(b"\x80\x02]q\x00h\x00a.").unwrap_err().contains("shared container"));
    }
}
