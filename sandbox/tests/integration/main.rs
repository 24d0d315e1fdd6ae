//! The sandbox end to end: a real program started by `spawn` in a real root.

mod hold;
mod spawn;
