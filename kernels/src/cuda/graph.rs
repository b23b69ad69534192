//! CUDA graphs: a sequence of launches captured once on a stream and replayed with one call, so a
//! decode step costs one launch instead of hundreds. Programs read positions and KV length from
//! device buffers, so the same graph serves every step.

use super::device::GpuDevice;
use super::error::{check, CudaError, CudaResult};
use cudarc::driver::{sys, CudaStream};

/// An instantiated graph.
pub struct CapturedGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

// SAFETY: graph handles may be used from any thread with the context current; we never share one
// between threads concurrently (launch takes &self but the driver serialises on the stream).
unsafe impl Send for CapturedGraph {}

impl std::fmt::Debug for CapturedGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CapturedGraph")
    }
}

impl CapturedGraph {
    /// Captures the work `record` enqueues on `stream` (nothing runs during capture) and
    /// instantiates it. If `record` fails the capture is ended and its error returned.
    pub fn capture(
        dev: &GpuDevice,
        stream: &CudaStream,
        record: impl FnOnce() -> CudaResult<()>,
    ) -> CudaResult<CapturedGraph> {
        dev.bind()?;
        let s = stream.cu_stream();
        // SAFETY: begin/end capture on a stream we own; the graph handles are locals destroyed on
        // failure or owned by the returned value.
        unsafe {
            check(
                "beginning a graph capture",
                sys::cuStreamBeginCapture_v2(
                    s,
                    sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
                ),
            )?;
            let recorded = record();
            let mut graph: sys::CUgraph = std::ptr::null_mut();
            let ended = check(
                "ending a graph capture",
                sys::cuStreamEndCapture(s, &mut graph),
            );
            if let Err(e) = recorded {
                if !graph.is_null() {
                    let _ = sys::cuGraphDestroy(graph);
                }
                return Err(e);
            }
            ended?;
            if graph.is_null() {
                return Err(CudaError::Invalid("graph capture produced no graph".into()));
            }
            let mut exec: sys::CUgraphExec = std::ptr::null_mut();
            if let Err(e) = check(
                "instantiating a graph",
                sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0),
            ) {
                let _ = sys::cuGraphDestroy(graph);
                return Err(e);
            }
            Ok(CapturedGraph { graph, exec })
        }
    }

    /// Enqueues the whole graph on `stream`.
    pub fn launch(&self, stream: &CudaStream) -> CudaResult<()> {
        // SAFETY: exec is a live instantiated graph owned by self.
        check("launching a graph", unsafe {
            sys::cuGraphLaunch(self.exec, stream.cu_stream())
        })
    }
}

impl Drop for CapturedGraph {
    fn drop(&mut self) {
        // SAFETY: both handles are owned by self and destroyed once.
        unsafe {
            let _ = sys::cuGraphExecDestroy(self.exec);
            let _ = sys::cuGraphDestroy(self.graph);
        }
    }
}
