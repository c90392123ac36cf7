//! A progress bar on stderr for passes over data, when stderr is a terminal.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use laplace::pass::Monitor;

/// Set by `--quiet`: no bar anywhere in this process.
static SILENCED: AtomicBool = AtomicBool::new(false);

/// Turn every progress bar of this process off (`--quiet`).
pub fn silence() {
    SILENCED.store(true, Ordering::Relaxed);
}

/// Draws `what [#####-----] done/total  elapsed` on stderr, one line per pass.
/// Silent when stderr is not a terminal (logs, pipes) or when turned off.
pub struct TerminalBar {
    on: bool,
    pass: Mutex<Option<(String, usize, Instant)>>,
}

impl TerminalBar {
    pub fn new(on: bool) -> Self {
        let on = on && !SILENCED.load(Ordering::Relaxed) && std::io::stderr().is_terminal();
        TerminalBar { on, pass: Mutex::new(None) }
    }

    fn draw(&self, done: usize) {
        let pass = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((what, total, start)) = pass.as_ref() {
            let width = 30;
            let filled = done.min(*total) * width / (*total).max(1);
            eprint!(
                "\r{what} [{}{}] {done}/{total} {:.1} s",
                "#".repeat(filled),
                "-".repeat(width - filled),
                start.elapsed().as_secs_f64()
            );
        }
    }
}

impl Monitor for TerminalBar {
    fn begin(&self, what: &str, batches: usize) {
        // One-batch passes finish before a bar would help (and the curvature
        // operator runs many of them): draw only longer ones.
        if self.on && batches > 1 {
            *self.pass.lock().unwrap_or_else(|e| e.into_inner()) = Some((what.to_string(), batches, Instant::now()));
            self.draw(0);
        }
    }

    fn progress(&self, done: usize) -> ControlFlow<()> {
        self.draw(done);
        ControlFlow::Continue(())
    }

    fn end(&self) {
        if self.pass.lock().unwrap_or_else(|e| e.into_inner()).take().is_some() {
            eprintln!();
        }
    }
}
