//! Parsing of GGUF files: header, metadata, tensor table, data section.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use super::{GgmlType, GgufTensorInfo, GgufValue, quant};
use crate::mapped::{map_file, mapped_tensor};
use crate::{DType, Element, Error, Result, Shape, Tensor};

/// `"GGUF"` as the first four bytes of the file.
const MAGIC: [u8; 4] = *b"GGUF";
/// Data section alignment when `general.alignment` is absent (gguf.md).
const DEFAULT_ALIGNMENT: usize = 32;
/// The metadata key that overrides the alignment.
const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal; real files nest once. The limit keeps a
/// crafted file from exhausting the stack.
const MAX_ARRAY_DEPTH: usize = 16;

/// A bounds-checked little-endian reader over the mapped file.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "file truncated: {what} needs {n} bytes at offset {} but only {} remain",
                self.pos,
                self.remaining()
            ));
        }
        let bytes = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let bytes = self.take(N, what)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of items each at least `min_size` bytes long, rejected if that
    /// many items cannot fit in the rest of the file (so nothing is allocated
    /// for an absurd count).
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, String> {
        let n = self.u64(what)?;
        usize::try_from(n)
            .ok()
            .filter(|&n| {
                n.checked_mul(min_size)
                    .is_some_and(|bytes| bytes <= self.remaining())
            })
            .ok_or_else(|| {
                format!(
                    "{what} {n} at offset {} is impossible: only {} bytes remain",
                    self.pos - 8,
                    self.remaining()
                )
            })
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.count(1, &format!("length of {what}"))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("{what} is not valid UTF-8: {e}"))
    }

    fn value(&mut self, type_id: u32, depth: usize, what: &str) -> Result<GgufValue, String> {
        Ok(match type_id {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)? {
                [0] => GgufValue::Bool(false),
                [1] => GgufValue::Bool(true),
                [b] => return Err(format!("{what}: bool byte {b} is neither 0 nor 1")),
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    ));
                }
                let elem_type = self.u32(what)?;
                let min_size = value_min_size(elem_type)
                    .ok_or_else(|| format!("{what}: unknown array element type {elem_type}"))?;
                let n = self.count(min_size, &format!("element count of {what}"))?;
                let mut values = Vec::with_capacity(n);
                for _ in 0..n {
                    values.push(self.value(elem_type, depth + 1, what)?);
                }
                GgufValue::Array(values)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{what}: unknown value type {other}")),
        })
    }
}

/// The fewest bytes a value of GGUF value type `type_id` can occupy.
fn value_min_size(type_id: u32) -> Option<usize> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        // Element type and count.
        9 => 12,
        _ => return None,
    })
}

/// A GGUF file, memory-mapped; tensors are read (or dequantized) on demand.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensor_infos: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    /// Absolute byte range of each tensor's data, parallel to `tensor_infos`.
    ranges: Vec<Range<usize>>,
    mmap: Arc<Mmap>,
    data_offset: usize,
    alignment: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensor_infos.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensor_infos: Vec<GgufTensorInfo>,
    ranges: Vec<Range<usize>>,
    data_offset: usize,
    alignment: usize,
}

fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let mut cursor = Cursor { bytes, pos: 0 };
    let magic = cursor.array::<4>("magic")?;
    if magic != MAGIC {
        return Err(format!("bad magic {magic:02x?}, expected \"GGUF\""));
    }
    let version = cursor.u32("version")?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (only versions 2 and 3)".into()),
        v if v.swap_bytes() <= 3 => return Err("big-endian GGUF files are not supported".into()),
        v => {
            return Err(format!(
                "unsupported GGUF version {v} (only versions 2 and 3)"
            ));
        }
    }
    // A tensor table entry is at least a name length, n_dims, type and offset.
    let tensor_count = cursor.count(8 + 4 + 4 + 8, "tensor count")?;
    // A metadata entry is at least a key length, a value type and a one-byte value.
    let kv_count = cursor.count(8 + 4 + 1, "metadata count")?;

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = cursor.string(&format!("key of metadata entry {i}"))?;
        let type_id = cursor.u32(&format!("type of metadata '{key}'"))?;
        let value = cursor.value(type_id, 0, &format!("metadata '{key}'"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key '{key}' appears twice"));
        }
    }
    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(value) => value
            .as_u32()
            .and_then(|a| usize::try_from(a).ok())
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| format!("{ALIGNMENT_KEY} must be a power of two, got {value:?}"))?,
    };

    let mut tensor_infos = Vec::with_capacity(tensor_count);
    let mut sizes = Vec::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let name = cursor.string(&format!("name of tensor {i}"))?;
        let what = format!("tensor '{name}'");
        let n_dims = cursor.u32(&what)?;
        let n_dims = usize::try_from(n_dims)
            .ok()
            .filter(|&n| n <= MAX_DIMS)
            .ok_or_else(|| {
                format!("{what} has {n_dims} dimensions, more than ggml's {MAX_DIMS}")
            })?;
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let dim = cursor.u64(&what)?;
            ne.push(
                usize::try_from(dim).map_err(|_| format!("{what}: dimension {dim} too large"))?,
            );
        }
        let ggml_type = GgmlType::from_id(cursor.u32(&what)?);
        let offset = cursor.u64(&what)?;
        let (block_elems, block_bytes) = ggml_type
            .block_layout()
            .ok_or_else(|| format!("{what} has {ggml_type}"))?;
        let elems = ne
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("{what}: element count of {ne:?} overflows"))?;
        // ggml quantizes along rows: the innermost dimension (ne[0]) holds whole blocks.
        let row = ne.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block_elems) {
            return Err(format!(
                "{what}: row of {row} elements is not a multiple of the {ggml_type} block size {block_elems}"
            ));
        }
        let size = (elems / block_elems)
            .checked_mul(block_bytes)
            .ok_or_else(|| format!("{what}: byte size overflows"))?;
        if offset % alignment as u64 != 0 {
            return Err(format!(
                "{what}: data offset {offset} is not a multiple of the alignment {alignment}"
            ));
        }
        ne.reverse();
        tensor_infos.push(GgufTensorInfo {
            name,
            dims: ne,
            ggml_type,
            offset,
        });
        sizes.push(size);
    }

    let data_offset = cursor.pos.next_multiple_of(alignment);
    let mut ranges = Vec::with_capacity(tensor_count);
    for (info, size) in tensor_infos.iter().zip(sizes) {
        let range = usize::try_from(info.offset)
            .ok()
            .and_then(|offset| data_offset.checked_add(offset))
            .and_then(|start| Some(start..start.checked_add(size)?))
            .filter(|range| range.end <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "tensor '{}': {size} bytes at data offset {} extend beyond the end of the file ({} bytes, data section at {data_offset})",
                    info.name,
                    info.offset,
                    bytes.len()
                )
            })?;
        ranges.push(range);
    }
    Ok(Parsed {
        version,
        metadata,
        tensor_infos,
        ranges,
        data_offset,
        alignment,
    })
}

fn dequantized<T: Element>(
    ggml_type: GgmlType,
    data: &[u8],
    shape: Shape,
) -> Result<Tensor, String> {
    let mut out = vec![T::zeroed(); shape.elem_count()];
    quant::dequantize(ggml_type, data, &mut out)?;
    Tensor::from_vec(out, shape).map_err(|e| e.to_string())
}

impl GgufFile {
    /// Opens and validates a GGUF file (versions 2 and 3, little-endian).
    ///
    /// The whole header and tensor table are checked here: every tensor's data
    /// must lie inside the file, so later reads cannot fail on bounds.
    pub fn open(path: &Path) -> Result<Self> {
        let mmap = map_file(path)?;
        let parsed = parse(&mmap).map_err(|message| Error::Gguf {
            path: path.to_path_buf(),
            message,
        })?;
        let mut by_name = HashMap::with_capacity(parsed.tensor_infos.len());
        for (i, info) in parsed.tensor_infos.iter().enumerate() {
            if by_name.insert(info.name.clone(), i).is_some() {
                return Err(Error::Gguf {
                    path: path.to_path_buf(),
                    message: format!("tensor '{}' appears twice", info.name),
                });
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: parsed.version,
            metadata: parsed.metadata,
            tensor_infos: parsed.tensor_infos,
            by_name,
            ranges: parsed.ranges,
            mmap,
            data_offset: parsed.data_offset,
            alignment: parsed.alignment,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The tensor table, in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensor_infos
    }

    /// One tensor's table entry.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensor_infos[i])
    }

    /// Byte offset of the data section in the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Alignment of the data section and of every tensor in it.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// A tensor decoded to `dtype` (f32, f16 or bf16), with the row-major
    /// shape of [`GgufTensorInfo::dims`].
    ///
    /// F32/F16/BF16 tensors asked for in their own dtype are read in place
    /// from the memory map; everything else is decoded into a new buffer.
    pub fn tensor(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let &index = self.by_name.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: self.path.clone(),
        })?;
        let info = &self.tensor_infos[index];
        let range = self.ranges[index].clone();
        let shape = Shape::from(info.dims.as_slice());
        let context = || format!("tensor '{name}' in {}", self.path.display());
        if !info.ggml_type.is_supported() {
            return Err(Error::UnsupportedDType {
                dtype: info.ggml_type.to_string(),
                context: context(),
            });
        }
        let same_type = matches!(
            (info.ggml_type, dtype),
            (GgmlType::F32, DType::F32)
                | (GgmlType::F16, DType::F16)
                | (GgmlType::BF16, DType::BF16)
        );
        if same_type {
            return mapped_tensor(&self.mmap, range, dtype, shape);
        }
        let data = &self.mmap[range];
        let decoded = match dtype {
            DType::F32 => dequantized::<f32>(info.ggml_type, data, shape),
            DType::F16 => dequantized::<f16>(info.ggml_type, data, shape),
            DType::BF16 => dequantized::<bf16>(info.ggml_type, data, shape),
            DType::U8 | DType::I32 | DType::U32 => {
                return Err(Error::UnsupportedDType {
                    dtype: dtype.name().to_string(),
                    context: format!("{}: GGUF tensors decode to f32, f16 or bf16", context()),
                });
            }
        };
        decoded.map_err(|message| Error::Gguf {
            path: self.path.clone(),
            message: format!("tensor '{name}': {message}"),
        })
    }
}
