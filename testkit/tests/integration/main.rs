//! Integration tests of the example images themselves, run directly on the host as root.

mod hostile;
