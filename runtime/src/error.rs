//! The engine's one error type.

/// Why loading, planning or an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The context is full.
    #[error("context full: {needed} positions needed but the context holds {n_ctx} (raise -c)")]
    ContextFull {
        /// Positions the request needs.
        needed: usize,
        /// Context size.
        n_ctx: usize,
    },
    /// The input does not fit the program or the engine.
    #[error("batch: {0}")]
    Batch(String),
    /// A token id is outside the vocabulary.
    #[error("token id {0} is outside the vocabulary of {1}")]
    BadToken(u32, usize),
    /// Nothing to evaluate.
    #[error("no tokens to evaluate")]
    Empty,
    /// A CPU kernel refused its input.
    #[error(transparent)]
    Kernel(#[from] pshard_kernels::matmul::KernelError),
    /// The graph could not be built.
    #[error(transparent)]
    Graph(#[from] pshard_model::arch::GraphError),
    /// A CUDA call or kernel failed (or no GPU).
    #[error(transparent)]
    Cuda(#[from] pshard_kernels::cuda::CudaError),
    /// The device failed otherwise.
    #[error("device: {0}")]
    Device(String),
    /// The model or plan uses something this engine cannot run.
    #[error("{0}")]
    Unsupported(String),
    /// Planning failed.
    #[error(transparent)]
    Plan(#[from] pshard_planner::PlanError),
}
