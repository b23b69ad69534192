//! Per-op GPU timing: while on, every launch sits between two timing events on the compute stream
//! (no CUDA graphs then), and the elapsed times are added up per [`OpKey`] (op kind, weight type
//! and shape, program tokens, rows) when asked for.

use std::collections::HashMap;
use std::sync::Mutex;

use pshard_kernels::cuda::{CudaEvent, DriverError, Gpu};

use crate::device::{GpuStep, GpuWork, OpKey, OpTime};
use crate::error::EngineError;
use crate::model::Model;

/// Timing state of a device.
#[derive(Default)]
pub struct OpTimer {
    on: bool,
    pending: Mutex<Vec<(OpKey, CudaEvent, CudaEvent)>>,
    done: Mutex<HashMap<OpKey, OpTime>>,
}

impl OpTimer {
    /// Whether launches are timed.
    pub fn on(&self) -> bool {
        self.on
    }

    /// Turns timing on or off.
    pub fn set(&mut self, on: bool) {
        self.on = on;
    }

    /// Runs `launch` between two timing events and remembers them under the step's key.
    pub fn time(
        &self,
        gpu: &Gpu,
        model: &Model,
        step: &GpuStep<'_>,
        launch: impl FnOnce() -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let err = |e: DriverError| EngineError::Device(format!("timing event: {e:?}"));
        let (a, b) = (gpu.dev.event(true)?, gpu.dev.event(true)?);
        a.record(gpu.stream()).map_err(err)?;
        launch()?;
        b.record(gpu.stream()).map_err(err)?;
        let mut key = match step.work {
            GpuWork::Node { node, .. } => OpKey::of(model, step.graph, *node),
            GpuWork::QkNormRope { nodes } => OpKey::of(model, step.graph, nodes.start),
        };
        if let GpuWork::QkNormRope { nodes } = step.work {
            key.op = if nodes.len() == 4 {
                "qk_norm+rope"
            } else {
                "rope q+k"
            };
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((key, a, b));
        Ok(())
    }

    fn settle(&self) {
        let pending: Vec<_> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        for (key, a, b) in pending {
            if b.synchronize().is_err() {
                continue;
            }
            if let Ok(ms) = a.elapsed_ms(&b) {
                let e = done.entry(key).or_default();
                e.calls += 1;
                e.seconds += f64::from(ms) * 1e-3;
            }
        }
    }

    /// Time per op key so far, largest total first (waits for the timed launches).
    pub fn times(&self) -> Vec<(OpKey, OpTime)> {
        self.settle();
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = done.iter().map(|(k, t)| (k.clone(), *t)).collect();
        v.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds).then(a.0.cmp(&b.0)));
        v
    }

    /// Forgets the accumulated times.
    pub fn clear(&mut self) {
        self.settle();
        self.done.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
