//! A loaded model: the mapped GGUF, its spec, f32 copies of the small vectors (norms, biases, rope
//! factors) and zero-copy views of the weight matrices.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use pshard_kernels::gemm::packed;
use pshard_kernels::matmul::{WeightLayout, WeightMatrix};
use pshard_kernels::quant;
use pshard_model::gguf::ModelFile;
use pshard_model::spec::{ModelSpec, TensorId};

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The GGUF file is unreadable or invalid.
    #[error(transparent)]
    Gguf(#[from] pshard_model::gguf::GgufError),
    /// The model's architecture or tensors are not what the catalogue expects.
    #[error("{path}: {source}")]
    Spec {
        /// File.
        path: String,
        /// Cause.
        source: pshard_model::catalogue::SpecError,
    },
    /// A tensor has a type the CPU engine cannot compute with.
    #[error("tensor {tensor} has type {ty}, which the CPU engine does not support (supported: {supported})")]
    UnsupportedType {
        /// Tensor name.
        tensor: String,
        /// Its type.
        ty: String,
        /// Supported types.
        supported: String,
    },
    /// The graph could not be built.
    #[error(transparent)]
    Graph(#[from] pshard_model::arch::GraphError),
}

/// A model ready to run.
pub struct Model {
    file: ModelFile,
    /// The model description.
    pub spec: ModelSpec,
    vectors: HashMap<TensorId, Vec<f32>>,
    /// Whether an engine may repack the matrices it alone computes ([`Model::repack`]).
    repack: bool,
    /// Matrices repacked for the CPU's decode kernels, set once by the engine.
    repacked: OnceLock<Repacked>,
}

/// The matrices of a model repacked into the CPU kernels' row-interleaved layout
/// ([`pshard_kernels::gemm::packed`]); a 3-D expert tensor's experts each repacked as a matrix of
/// its own, one after the other as in the file.
#[derive(Default)]
struct Repacked {
    mats: HashMap<TensorId, Vec<u8>>,
    secs: f64,
    /// Why nothing was repacked, when memory was short.
    skipped: Option<String>,
}

/// Bytes of a tensor repacked between two releases of its mapped pages: the most a repack holds
/// in both copies at once (bounds the load's peak resident size; each part is one pool job).
const REPACK_PART: usize = 4 << 20;

/// Memory available to new allocations (Linux `MemAvailable`), if readable.
pub fn mem_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Model {
    /// Maps the file, builds the spec and checks every tensor the forward pass uses is computable.
    pub fn open(path: &Path) -> Result<Model, LoadError> {
        let file = ModelFile::open(path)?;
        let spec = ModelSpec::from_file(&file).map_err(|source| LoadError::Spec {
            path: path.display().to_string(),
            source,
        })?;
        Model::from_parts(file, spec)
    }

    /// Builds a model from an opened file and its spec.
    pub fn from_parts(file: ModelFile, spec: ModelSpec) -> Result<Model, LoadError> {
        let graph = pshard_model::arch::build_graph(&spec, 1, 1)?;
        let mut vectors = HashMap::new();
        for node in &graph.nodes {
            for id in node.op.weights() {
                let t = spec.tensor(id);
                let Some(k) = quant::kernel(t.ty) else {
                    return Err(LoadError::UnsupportedType {
                        tensor: t.name.clone(),
                        ty: t.ty.name().to_string(),
                        supported: quant::SUPPORTED
                            .iter()
                            .map(|t| t.name())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                };
                if !t.is_matrix() && !vectors.contains_key(&id) {
                    let mut v = vec![0f32; t.dims.iter().product::<u64>() as usize];
                    (k.dequantize_row)(file.tensor_data(t.file_index), &mut v);
                    vectors.insert(id, v);
                }
            }
        }
        Ok(Model {
            file,
            spec,
            vectors,
            repack: true,
            repacked: OnceLock::new(),
        })
    }

    /// Turns repacking off (on by default): engines then compute from the mapped file's layout.
    /// The results are the same bits either way; this is for A/B timing.
    pub fn set_repack(&mut self, on: bool) {
        self.repack = on;
    }

    /// Repacks the matrices `ids` whose type has a repacked layout into anonymous memory (2-D
    /// matrices and each expert of a 3-D expert tensor; groups in parallel over the CPU pool),
    /// dropping their mapped pages part by part as the copy advances: [`Model::matrix`] then
    /// hands out the repacked copies. Only the first call of a model does anything, and nothing
    /// when repacking is off, the CPU lacks the repacked kernels (AVX-512 VNNI), or the copies
    /// would not fit in the memory available ([`Model::repack_skipped`] says why). Callers pass
    /// the matrices only the CPU reads: the GPU lanes upload from the file.
    pub fn repack(&self, ids: &[TensorId]) {
        if !self.repack || self.repacked.get().is_some() {
            return;
        }
        let t0 = std::time::Instant::now();
        let mut todo: Vec<TensorId> = ids
            .iter()
            .copied()
            .filter(|&id| self.repack_shape(id).is_some())
            .collect();
        todo.sort_by_key(|t| t.0);
        todo.dedup();
        let need: u64 = todo.iter().map(|&id| self.spec.tensor(id).bytes).sum();
        // The copies replace the mapped pages, which the kernel can evict; an eighth of what is
        // available stays for the KV cache and the buffers.
        if let Some(avail) = mem_available_bytes() {
            if need > avail - avail / 8 {
                let skipped = Some(format!(
                    "repacking the CPU matrices needs {:.1} GiB but {:.1} GiB of memory is \
                     available: computing from the file's layout",
                    need as f64 / GIB,
                    avail as f64 / GIB
                ));
                let _ = self.repacked.set(Repacked {
                    skipped,
                    ..Repacked::default()
                });
                return;
            }
        }
        let mats = todo
            .into_iter()
            .map(|id| (id, self.repack_tensor(id)))
            .collect();
        let secs = t0.elapsed().as_secs_f64();
        let _ = self.repacked.set(Repacked {
            mats,
            secs,
            skipped: None,
        });
    }

    /// Rows and row bytes of one matrix of tensor `id`, if its type and shape take the repacked
    /// layout.
    fn repack_shape(&self, id: TensorId) -> Option<(usize, usize)> {
        let t = self.spec.tensor(id);
        let per = self.file.tensor_data(t.file_index).len() / t.n_mats();
        let (rows, wrb) = (t.rows(), per / t.rows().max(1));
        let ok = t.is_matrix()
            && rows > 0
            && rows * wrb == per
            && packed::computes_repacked(t.ty, per, rows, wrb);
        ok.then_some((rows, wrb))
    }

    /// Tensor `id` (its shape checked by [`Model::repack_shape`]) repacked, expert by expert,
    /// [`REPACK_PART`] bytes of whole groups at a time, each part's mapped pages dropped once it
    /// is copied (they are never read again: they would only double the resident size).
    fn repack_tensor(&self, id: TensorId) -> Vec<u8> {
        let t = self.spec.tensor(id);
        let (rows, wrb) = self.repack_shape(id).expect("checked by the caller");
        let data = self.file.tensor_data(t.file_index);
        let per = rows * wrb;
        let gb = packed::ROWS * wrb;
        let step = (REPACK_PART / gb).max(1) * gb;
        let mut out = vec![0u8; data.len()];
        let mut released = 0u64;
        for e in 0..t.n_mats() {
            let base = e * per;
            let mut a = 0;
            while a < per {
                // Whole groups; the last part of a matrix takes its rows after the last group.
                let b = if per - a < step + gb { per } else { a + step };
                let (src, dst) = (&data[base + a..base + b], &mut out[base + a..base + b]);
                packed::repack_into(t.ty, src, (b - a) / wrb, wrb, dst)
                    .expect("the shape was checked");
                let upto = (base + b) as u64;
                if let Ok(r) = self.file.release_tensor_range(t.file_index, released..upto) {
                    if !r.is_empty() {
                        released = r.end;
                    }
                }
                a = b;
            }
        }
        out
    }

    /// What [`Model::repack`] did: matrices, bytes and seconds (`None`: nothing repacked).
    pub fn repack_stats(&self) -> Option<(usize, u64, f64)> {
        let r = self.repacked.get().filter(|r| !r.mats.is_empty())?;
        let bytes = r.mats.values().map(|m| m.len() as u64).sum();
        Some((r.mats.len(), bytes, r.secs))
    }

    /// Why [`Model::repack`] repacked nothing though it was asked to: memory was short.
    pub fn repack_skipped(&self) -> Option<&str> {
        self.repacked.get()?.skipped.as_deref()
    }

    /// The weight matrix `id` (for 3-D expert tensors, `expert` selects one matrix).
    pub fn matrix(&self, id: TensorId, expert: usize) -> WeightMatrix<'_> {
        let t = self.spec.tensor(id);
        let (data, layout) = match self.repacked.get().and_then(|r| r.mats.get(&id)) {
            Some(p) => (&p[..], WeightLayout::Interleaved),
            None => (self.file.tensor_data(t.file_index), WeightLayout::File),
        };
        let per = data.len() / t.n_mats();
        WeightMatrix {
            ty: t.ty,
            data: &data[expert * per..][..per],
            rows: t.rows(),
            cols: t.cols(),
            layout,
        }
    }

    /// An f32 copy of a small vector tensor (norm weight, bias, rope factors).
    pub fn vector(&self, id: TensorId) -> &[f32] {
        &self.vectors[&id]
    }

    /// The mapped file.
    pub fn file(&self) -> &ModelFile {
        &self.file
    }
}

const GIB: f64 = (1u64 << 30) as f64;
