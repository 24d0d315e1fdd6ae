//! What a finished command leaves for `main`: success, an action's failure to print with
//! its exit code, or an exit code of the command's own.

use crate::action::ActionError;

/// What `main` does with a finished command.
#[derive(Debug)]
pub enum Outcome {
    /// Success.
    Done,
    /// An action failed; print it and exit with its code.
    Failed(ActionError),
    /// A command that maps its own exit code (bisect steps).
    Exit(i32),
}
