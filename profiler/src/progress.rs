//! A progress bar on stderr (indicatif), or nothing when disabled.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Progress over a known number of measurement steps.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar of `steps` steps, drawn only when `show`.
    pub fn new(steps: u64, show: bool) -> Progress {
        let bar = show.then(|| {
            let b = ProgressBar::new(steps);
            if let Ok(style) = ProgressStyle::with_template(
                "{elapsed_precise:.dim} [{bar:30}] {pos}/{len} {wide_msg}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Progress { bar }
    }

    /// Starts the next step, named `what`.
    pub fn step(&self, what: &str) {
        if let Some(b) = &self.bar {
            b.set_message(what.to_string());
            b.inc(1);
        }
    }

    /// Ends the bar with the total time.
    pub fn finish(&self, took: Duration) {
        if let Some(b) = &self.bar {
            b.finish_with_message(format!("done in {:.1} s", took.as_secs_f64()));
        }
    }
}
