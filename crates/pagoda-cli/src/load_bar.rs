//! The progress bar on stderr while a model's weights load: bytes of the checkpoint placed, the
//! rate, and the time left.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use pagoda_models::{LoadEvent, LoadProgress};

/// How often the bar redraws on its own, so that the elapsed time and the estimate keep moving
/// while one large tensor loads.
const TICK: Duration = Duration::from_millis(200);

/// A load's progress bar; hidden when stderr is not a terminal (a log file, CI, tests).
pub struct LoadBar {
    bar: ProgressBar,
    /// The bar's look once the loader has said how many bytes there are.
    style: Option<ProgressStyle>,
}

impl LoadBar {
    /// Shows a spinner for loading `model` (the tokenizer and config come first), which turns
    /// into a bar with the loader's first event.
    pub fn start(model: &Path) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self {
                bar: ProgressBar::hidden(),
                style: None,
            };
        }
        let bar = ProgressBar::no_length();
        if let Ok(spinner) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            bar.set_style(spinner);
        }
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30.cyan/blue}] {binary_bytes}/{binary_total_bytes} \
             {binary_bytes_per_sec} ETA {eta}",
        )
        .ok()
        .map(|style| style.progress_chars("=> "));
        bar.set_message(format!("loading {}", model.display()));
        bar.enable_steady_tick(TICK);
        Self { bar, style }
    }

    /// The callback that moves the bar, for the loader to call as tensors are placed
    /// ([`pagoda_engine::EngineBuilder::on_load_progress`]).
    pub fn callback(&self) -> impl Fn(LoadEvent) + Send + Sync + 'static {
        let bar = self.bar.clone();
        let style = self.style.clone();
        move |event: LoadEvent| {
            if bar.length().is_none()
                && let Some(style) = &style
            {
                bar.set_style(style.clone());
            }
            bar.set_length(event.bytes_total);
            bar.set_position(event.bytes_done);
        }
    }

    /// [`Self::callback`] for [`pagoda_models::LoadOptions`].
    pub fn progress(&self) -> LoadProgress {
        LoadProgress::new(self.callback())
    }

    /// Takes the bar off the terminal, whether the load succeeded or not.
    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_set_the_length_and_position() {
        let bar = LoadBar::start(Path::new("model.gguf"));
        let report = bar.callback();
        for done in [0, 300, 1000] {
            report(LoadEvent {
                bytes_done: done,
                bytes_total: 1000,
                tensors_done: 0,
                tensors_total: 3,
            });
            assert_eq!(bar.bar.position(), done);
            assert_eq!(bar.bar.length(), Some(1000));
        }
        bar.finish();
    }
}
