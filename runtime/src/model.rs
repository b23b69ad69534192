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
/// ([`pshard_kernels::gemm::packed`]).
#[derive(Default)]
struct Repacked {
    mats: HashMap<TensorId, Vec<u8>>,
    secs: f64,
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

    /// Repacks the 2-D matrices `ids` whose type has a repacked layout into anonymous memory
    /// (groups in parallel over the CPU pool) and drops their mapped pages: [`Model::matrix`]
    /// then hands out the repacked copies. Only the first call of a model does anything, and
    /// nothing when repacking is off or the CPU lacks the repacked kernels (AVX-512 VNNI).
    /// Callers pass the matrices only the CPU reads: the GPU lanes upload from the file.
    pub fn repack(&self, ids: &[TensorId]) {
        if !self.repack || !quant::SimdLevel::Avx512.available() || self.repacked.get().is_some() {
            return;
        }
        let t0 = std::time::Instant::now();
        let mut mats = HashMap::new();
        for &id in ids {
            let t = self.spec.tensor(id);
            if t.n_mats() != 1 || !packed::supported(t.ty) || mats.contains_key(&id) {
                continue;
            }
            let data = self.file.tensor_data(t.file_index);
            let wrb = data.len() / t.rows().max(1);
            // A shape the layout does not take stays in the file's layout.
            if let Ok(p) = packed::repack(t.ty, data, t.rows(), wrb) {
                mats.insert(id, p);
                // Never read again from the map: its pages would only double the resident size.
                let _ = self.file.release_pages(t.file_index);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let _ = self.repacked.set(Repacked { mats, secs });
    }

    /// What [`Model::repack`] did: matrices, bytes and seconds (`None`: nothing repacked).
    pub fn repack_stats(&self) -> Option<(usize, u64, f64)> {
        let r = self.repacked.get().filter(|r| !r.mats.is_empty())?;
        let bytes = r.mats.values().map(|m| m.len() as u64).sum();
        Some((r.mats.len(), bytes, r.secs))
    }

    /// The weight matrix `id` (for 3-D expert tensors, `expert` selects one matrix).
    pub fn matrix(&self, id: TensorId, expert: usize) -> WeightMatrix<'_> {
        let t = self.spec.tensor(id);
        if let Some(p) = self.repacked.get().and_then(|r| r.mats.get(&id)) {
            return WeightMatrix {
                ty: t.ty,
                data: p,
                rows: t.rows(),
                cols: t.cols(),
                layout: WeightLayout::Interleaved,
            };
        }
        let data = self.file.tensor_data(t.file_index);
        let per = data.len() / t.n_mats();
        WeightMatrix {
            ty: t.ty,
            data: &data[expert * per..][..per],
            rows: t.rows(),
            cols: t.cols(),
            layout: WeightLayout::File,
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
