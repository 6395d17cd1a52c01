//! Training: settings, data, the loop, resumable states, and the main job's corpus.

pub mod arithmetic;
pub mod data;
pub mod grammar;
pub mod plot;
pub mod prepare;
pub mod run;
pub mod settings;
pub mod state;

pub use run::{train, Outcome};
pub use settings::{Resolved, TrainSettings};
