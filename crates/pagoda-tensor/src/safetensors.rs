//! Reader for the safetensors format: one file, or the shards of a Hugging Face
//! checkpoint directory, memory-mapped and read in place.
//!
//! A file is an 8-byte little-endian header length `n`, `n` bytes of JSON
//! mapping each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}`
//! (offsets relative to the end of the header), an optional `"__metadata__"`
//! object, then the tensor bytes (<https://github.com/huggingface/safetensors>).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::Deserialize;

use crate::mapped::{map_file, mapped_tensor};
use crate::{DType, Error, Result, Shape, Tensor};

/// The single-file checkpoint name inside a model directory.
const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name inside a sharded model directory.
const INDEX_FILE: &str = "model.safetensors.index.json";
/// Key of the free-form string metadata in the header.
const METADATA_KEY: &str = "__metadata__";

/// The dtypes of the safetensors specification with their element sizes,
/// so that tensors of types this crate cannot load are still validated.
fn file_dtype(name: &str) -> Option<(usize, Option<DType>)> {
    Some(match name {
        "F32" => (4, Some(DType::F32)),
        "F16" => (2, Some(DType::F16)),
        "BF16" => (2, Some(DType::BF16)),
        "U8" => (1, Some(DType::U8)),
        "I32" => (4, Some(DType::I32)),
        "U32" => (4, Some(DType::U32)),
        "BOOL" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => (1, None),
        "I16" | "U16" => (2, None),
        "F64" | "I64" | "U64" => (8, None),
        _ => return None,
    })
}

/// One tensor's header entry as it appears in the JSON.
#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// A validated tensor entry.
struct Entry {
    shard: usize,
    /// The dtype as the file names it.
    file_dtype: String,
    /// `None` for valid safetensors dtypes that this crate does not load.
    dtype: Option<DType>,
    shape: Vec<usize>,
    /// Absolute byte range in the shard's file.
    range: Range<usize>,
}

struct Shard {
    path: PathBuf,
    mmap: Arc<Mmap>,
}

/// The tensors of one safetensors file or of all shards of a checkpoint.
pub struct SafeTensors {
    /// The file, or the directory for a checkpoint opened with [`SafeTensors::open_dir`].
    location: PathBuf,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensors")
            .field("location", &self.location)
            .field("shards", &self.shards.len())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn format_error(path: &Path, message: impl Into<String>) -> Error {
    Error::SafeTensors {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Parses and validates the header of the file mapped as `mmap`.
fn parse_header(path: &Path, mmap: &[u8], shard: usize) -> Result<Vec<(String, Entry)>> {
    let Some((len_bytes, rest)) = mmap.split_first_chunk::<8>() else {
        return Err(format_error(
            path,
            format!(
                "file is {} bytes, too short for the 8-byte header length",
                mmap.len()
            ),
        ));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    let header_len = usize::try_from(header_len)
        .ok()
        .filter(|&n| n <= rest.len())
        .ok_or_else(|| {
            format_error(
                path,
                format!(
                    "header length {header_len} exceeds the {} bytes after it",
                    rest.len()
                ),
            )
        })?;
    let data_start = 8 + header_len;
    let data_len = rest.len() - header_len;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&rest[..header_len])
            .map_err(|e| format_error(path, format!("header is not a JSON object: {e}")))?;

    let mut entries = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == METADATA_KEY {
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value)
            .map_err(|e| format_error(path, format!("tensor '{name}': malformed entry: {e}")))?;
        let Some((elem_size, dtype)) = file_dtype(&raw.dtype) else {
            return Err(format_error(
                path,
                format!("tensor '{name}': unknown dtype '{}'", raw.dtype),
            ));
        };
        let [begin, end] = raw.data_offsets;
        if begin > end || end > data_len {
            return Err(format_error(
                path,
                format!(
                    "tensor '{name}': data_offsets [{begin}, {end}] outside the {data_len}-byte data section"
                ),
            ));
        }
        let expected = Shape::from(raw.shape.as_slice())
            .checked_elem_count()
            .and_then(|n| n.checked_mul(elem_size));
        if expected != Some(end - begin) {
            return Err(format_error(
                path,
                format!(
                    "tensor '{name}': {} bytes of data for shape {:?} of {}",
                    end - begin,
                    raw.shape,
                    raw.dtype
                ),
            ));
        }
        let entry = Entry {
            shard,
            file_dtype: raw.dtype,
            dtype,
            shape: raw.shape,
            range: data_start + begin..data_start + end,
        };
        entries.push((name, entry));
    }
    Ok(entries)
}

/// The shard index of a sharded checkpoint: which file holds each tensor.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl SafeTensors {
    /// Opens one `.safetensors` file.
    pub fn open(path: &Path) -> Result<Self> {
        let mut tensors = SafeTensors {
            location: path.to_path_buf(),
            shards: Vec::new(),
            entries: BTreeMap::new(),
        };
        tensors.add_shard(path)?;
        Ok(tensors)
    }

    /// Opens a checkpoint directory: `model.safetensors`, or every shard named
    /// in the `weight_map` of `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        if !index_path.is_file() {
            let single = dir.join(SINGLE_FILE);
            if !single.is_file() {
                return Err(format_error(
                    dir,
                    format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
                ));
            }
            let mut tensors = SafeTensors::open(&single)?;
            tensors.location = dir.to_path_buf();
            return Ok(tensors);
        }
        let text = std::fs::read(&index_path).map_err(|source| Error::Io {
            path: index_path.clone(),
            source,
        })?;
        let index: ShardIndex = serde_json::from_slice(&text)
            .map_err(|e| format_error(&index_path, format!("malformed shard index: {e}")))?;
        let files: std::collections::BTreeSet<&str> =
            index.weight_map.values().map(String::as_str).collect();
        let mut tensors = SafeTensors {
            location: dir.to_path_buf(),
            shards: Vec::new(),
            entries: BTreeMap::new(),
        };
        for file in files {
            tensors.add_shard(&dir.join(file))?;
        }
        for (name, file) in &index.weight_map {
            let found = tensors
                .entries
                .get(name)
                .map(|e| &tensors.shards[e.shard].path);
            if found != Some(&dir.join(file)) {
                return Err(format_error(
                    &index_path,
                    format!("weight_map puts '{name}' in {file}, but that shard does not hold it"),
                ));
            }
        }
        Ok(tensors)
    }

    fn add_shard(&mut self, path: &Path) -> Result<()> {
        let mmap = map_file(path)?;
        let shard = self.shards.len();
        for (name, entry) in parse_header(path, &mmap, shard)? {
            if let Some(previous) = self.entries.get(&name) {
                let other = self.shards[previous.shard].path.display();
                return Err(format_error(
                    path,
                    format!("tensor '{name}' also appears in {other}"),
                ));
            }
            self.entries.insert(name, entry);
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            mmap,
        });
        Ok(())
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The dtype and shape of a tensor, without loading it; `None` if it is
    /// missing or of a dtype this crate does not load.
    pub fn info(&self, name: &str) -> Option<(DType, &[usize])> {
        let entry = self.entries.get(name)?;
        Some((entry.dtype?, &entry.shape))
    }

    /// The dtype of a tensor as the file names it (`"F32"`, `"I64"`, ...).
    pub fn file_dtype(&self, name: &str) -> Option<&str> {
        self.entries.get(name).map(|e| e.file_dtype.as_str())
    }

    /// A tensor, read in place from the memory map (copied once if its bytes
    /// are not aligned for its dtype).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: self.location.clone(),
        })?;
        let shard = &self.shards[entry.shard];
        let dtype = entry.dtype.ok_or_else(|| Error::UnsupportedDType {
            dtype: entry.file_dtype.clone(),
            context: format!("tensor '{name}' in {}", shard.path.display()),
        })?;
        mapped_tensor(
            &shard.mmap,
            entry.range.clone(),
            dtype,
            Shape::from(entry.shape.as_slice()),
        )
    }

    /// A tensor converted to `dtype` on load (read in place if it already has it).
    pub fn get_as(&self, name: &str, dtype: DType) -> Result<Tensor> {
        self.get(name)?.to_dtype(dtype)
    }
}
