//! A model opened from disk: one GGUF file or a split set (`NAME-00001-of-0000N.gguf` with `split.count` /
//! `split.no` metadata), memory-mapped read-only and presented as one model. Tensor data is never copied.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{GgufError, GgufHeader, TensorInfo};

/// Metadata key: number of files in a split set.
pub const SPLIT_COUNT_KEY: &str = "split.count";
/// Metadata key: index of this file in its split set (0-based).
pub const SPLIT_NO_KEY: &str = "split.no";
/// Metadata key: total tensors over all files of a split set.
pub const SPLIT_TENSORS_COUNT_KEY: &str = "split.tensors.count";

/// A model opened from disk: one file or a split set (`*-00001-of-0000N.gguf`, `split.count`/`split.no`),
/// opened as one model. Read-only memmap2 maps.
pub struct ModelFile {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    headers: Vec<GgufHeader>,
    tensors: Vec<TensorInfo>,
    /// (split, absolute start of the data in that split) per tensor.
    locations: Vec<(usize, u64)>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("paths", &self.paths)
            .field("tensors", &self.tensors.len())
            .field("file_size", &self.file_size())
            .finish()
    }
}

fn name_of(path: &Path) -> String {
    path.display().to_string()
}

fn map_file(path: &Path) -> Result<Mmap, GgufError> {
    let file = File::open(path)
        .map_err(|e| GgufError::new(&name_of(path), 0, format!("cannot open: {e}")))?;
    // SAFETY: the map is read-only and private to this process. Another process truncating or rewriting
    // the file while it is mapped would change what we read (or fault); model files are not modified in
    // place while in use, which is the usual contract of mmap-based model loaders.
    unsafe { Mmap::map(&file) }
        .map_err(|e| GgufError::new(&name_of(path), 0, format!("cannot map: {e}")))
}

/// Splits `DIR/PREFIX-00002-of-00005.gguf` into (`DIR/PREFIX`, 2, 5, digit width of the split number).
fn split_name_parts(path: &Path) -> Option<(String, u64, u64, usize)> {
    let s = path.to_str()?;
    let stem = s.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(count) || !digits(no) {
        return None;
    }
    Some((
        prefix.to_owned(),
        no.parse().ok()?,
        count.parse().ok()?,
        no.len(),
    ))
}

/// `split.count` of a header: 1 when absent.
fn split_count(h: &GgufHeader, file: &str) -> Result<u64, GgufError> {
    match h.get(SPLIT_COUNT_KEY) {
        None => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=99_999).contains(&n) => Ok(n),
            _ => Err(GgufError::new(
                file,
                0,
                format!("{SPLIT_COUNT_KEY} is {v:?}, expected a count 1..=99999"),
            )),
        },
    }
}

impl ModelFile {
    /// Opens a GGUF model: a single file, or a split set given the path of any of its files.
    pub fn open(path: &Path) -> Result<ModelFile, GgufError> {
        let first_map = map_file(path)?;
        let first_name = name_of(path);
        let first = GgufHeader::parse(&first_map, &first_name)?;
        let count = split_count(&first, &first_name)?;
        if count == 1 {
            return Self::assemble(vec![path.to_path_buf()], vec![first_map], vec![first]);
        }

        let Some((prefix, _, name_count, width)) = split_name_parts(path) else {
            return Err(GgufError::new(
                &first_name,
                0,
                format!("{SPLIT_COUNT_KEY} is {count} but the file name does not look like NAME-00001-of-{count:05}.gguf"),
            ));
        };
        if name_count != count {
            return Err(GgufError::new(
                &first_name,
                0,
                format!("{SPLIT_COUNT_KEY} is {count} but the file name says {name_count} files"),
            ));
        }
        let given_no = first.get(SPLIT_NO_KEY).and_then(|v| v.as_u64());
        let mut given = Some((first_map, first));
        let (mut paths, mut maps, mut headers) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..count {
            let p = PathBuf::from(format!(
                "{prefix}-{:0width$}-of-{:0width$}.gguf",
                i + 1,
                count
            ));
            let name = name_of(&p);
            // Reuse the map of the file we were given rather than mapping it twice.
            let (map, h) = match given.take() {
                Some(g) if given_no == Some(i) && p == path => g,
                g => {
                    given = g;
                    let map = map_file(&p)?;
                    let h = GgufHeader::parse(&map, &name)?;
                    (map, h)
                }
            };
            let c = split_count(&h, &name)?;
            if c != count {
                return Err(GgufError::new(
                    &name,
                    0,
                    format!("{SPLIT_COUNT_KEY} is {c} but {} says {count}", first_name),
                ));
            }
            match h.get(SPLIT_NO_KEY).and_then(|v| v.as_u64()) {
                Some(no) if no == i => {}
                other => {
                    return Err(GgufError::new(
                        &name,
                        0,
                        format!(
                            "{SPLIT_NO_KEY} is {other:?}, expected {i} for split {} of {count}",
                            i + 1
                        ),
                    ))
                }
            }
            paths.push(p);
            maps.push(map);
            headers.push(h);
        }
        Self::assemble(paths, maps, headers)
    }

    fn assemble(
        paths: Vec<PathBuf>,
        maps: Vec<Mmap>,
        headers: Vec<GgufHeader>,
    ) -> Result<ModelFile, GgufError> {
        let total: usize = headers.iter().map(|h| h.tensors.len()).sum();
        if let Some(v) = headers[0].get(SPLIT_TENSORS_COUNT_KEY) {
            if v.as_u64() != Some(total as u64) {
                return Err(GgufError::new(
                    &name_of(&paths[0]),
                    0,
                    format!(
                        "{SPLIT_TENSORS_COUNT_KEY} is {v:?} but the files hold {total} tensors"
                    ),
                ));
            }
        }
        let mut tensors = Vec::with_capacity(total);
        let mut locations = Vec::with_capacity(total);
        let mut by_name = HashMap::with_capacity(total);
        for (split, h) in headers.iter().enumerate() {
            for t in &h.tensors {
                if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                    return Err(GgufError::new(
                        &name_of(&paths[split]),
                        0,
                        format!("tensor {:?} appears in more than one split", t.name),
                    ));
                }
                locations.push((split, h.data_offset + t.offset));
                tensors.push(t.clone());
            }
        }
        Ok(ModelFile {
            paths,
            maps,
            headers,
            tensors,
            locations,
            by_name,
        })
    }

    /// The first split's header (the model's metadata).
    pub fn header(&self) -> &GgufHeader {
        &self.headers[0]
    }

    /// The headers of every split, in order.
    pub fn split_headers(&self) -> &[GgufHeader] {
        &self.headers
    }

    /// All tensors across splits, in order; the index into this slice is the `file_index`. Each
    /// tensor's `offset` is relative to its own split's data section; see [`ModelFile::map_ranges`].
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The `file_index` of the tensor called `name`.
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The data of a tensor, borrowed from the map (validated range, no copy).
    ///
    /// # Panics
    /// If `file_index` is not below `tensors().len()`.
    pub fn tensor_data(&self, file_index: usize) -> &[u8] {
        let (split, r) = self.map_ranges(file_index);
        &self.maps[split][r.start as usize..r.end as usize]
    }

    /// The files, in split order.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The whole mapped bytes of split `split`.
    pub fn split_bytes(&self, split: usize) -> &[u8] {
        &self.maps[split]
    }

    /// Total bytes of all splits.
    pub fn file_size(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum()
    }

    /// Sum of the tensors' data bytes.
    pub fn tensor_data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// The split holding a tensor and the absolute byte range of its data in that split's file.
    ///
    /// # Panics
    /// If `file_index` is not below `tensors().len()`.
    pub fn map_ranges(&self, file_index: usize) -> (usize, Range<u64>) {
        let (split, start) = self.locations[file_index];
        (split, start..start + self.tensors[file_index].bytes)
    }

    /// Drops the resident pages of a tensor's data from this process (the whole pages inside its
    /// range), e.g. after uploading it to a GPU that keeps the only live copy. The mapping stays
    /// valid: a later read faults the bytes back in from the file. Returns the bytes released.
    #[cfg(unix)]
    pub fn release_pages(&self, file_index: usize) -> std::io::Result<u64> {
        let bytes = self.tensors[file_index].bytes;
        let r = self.release_tensor_range(file_index, 0..bytes)?;
        Ok(r.end - r.start)
    }

    /// [`ModelFile::release_pages`] for bytes `range` of a tensor's data (offsets from its first
    /// byte): drops the whole pages inside it, so a copy that advances through a tensor can let
    /// go of what it has read. Returns the range released (whole pages, offsets from the
    /// tensor's first byte; empty when no whole page lies inside): a next call from its end
    /// loses no page that straddles the two.
    ///
    /// # Panics
    /// If `file_index` is not below `tensors().len()` or `range` ends past the tensor's data.
    #[cfg(unix)]
    pub fn release_tensor_range(
        &self,
        file_index: usize,
        range: Range<u64>,
    ) -> std::io::Result<Range<u64>> {
        const PAGE: u64 = 4096;
        let (split, t) = self.map_ranges(file_index);
        assert!(
            range.end <= t.end - t.start,
            "bytes {range:?} of a {}-byte tensor",
            t.end - t.start
        );
        let start = (t.start + range.start).div_ceil(PAGE) * PAGE;
        let end = (t.start + range.end) / PAGE * PAGE;
        if end <= start {
            return Ok(range.start..range.start);
        }
        // SAFETY: the map is a read-only mapping of a file we never write through, so MADV_DONTNEED
        // discards no data: pages are re-read from the file on the next access, and no Rust
        // reference observes different bytes. The range lies inside this split's map (the
        // tensor's, checked by the reader when the tensor table was validated, and `range` inside
        // it, asserted above) and is page-aligned as madvise requires.
        unsafe {
            self.maps[split].unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start as usize,
                (end - start) as usize,
            )?;
        }
        Ok(start - t.start..end - t.start)
    }
}
