//! A loaded model: the mapped GGUF, its spec, f32 copies of the small vectors (norms, biases, rope
//! factors) and zero-copy views of the weight matrices.

use std::collections::HashMap;
use std::path::Path;

use pshard_kernels::matmul::WeightMatrix;
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
        })
    }

    /// The weight matrix `id` (for 3-D expert tensors, `expert` selects one matrix).
    pub fn matrix(&self, id: TensorId, expert: usize) -> WeightMatrix<'_> {
        let t = self.spec.tensor(id);
        let data = self.file.tensor_data(t.file_index);
        let per = data.len() / t.n_mats();
        WeightMatrix {
            ty: t.ty,
            data: &data[expert * per..][..per],
            rows: t.rows(),
            cols: t.cols(),
            layout: pshard_kernels::matmul::WeightLayout::File,
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
